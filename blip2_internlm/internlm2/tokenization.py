"""InternLM2 tokenizer over the checkpoint's SentencePiece ``tokenizer.model``.

Encoding and decoding reproduce the official slow ``InternLM2Tokenizer``
(``tokenization_internlm2.py``), quirks included:

* ids are SentencePiece's own ``encode`` of each text segment between special tokens;
  whether a leading "▁" is added is decided by the model file (``add_dummy_prefix``);
* ``<s>`` is prepended by default, ``</s>`` is not appended; ``pad_token`` is ``</s>``;
* ``convert_tokens_to_string`` puts one space before a run of special tokens (so a
  decoded sequence that starts with ``<s>`` starts with " <s>") and always applies
  ``clean_up_tokenization`` (" ," -> ","), whatever ``clean_up_tokenization_spaces`` says.

Deliberate differences: ``get_special_tokens_mask`` and
``create_token_type_ids_from_sequences`` describe the sequence actually built (the
official ones count an EOS that is never added, so their lengths were wrong).
"""

from __future__ import annotations

import os
from shutil import copyfile
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
SPIECE_UNDERLINE = "▁"
NEWLINE_BYTE_PIECE = "<0x0A>"


def newline_token_id(sp_model: spm.SentencePieceProcessor) -> int:
    """Id of the piece a bare "\\n" encodes to, never a lone "▁" dummy-prefix piece.

    With the official model (byte fallback, no dummy prefix) this is the byte piece
    ``<0x0A>``. Raises ``ValueError`` if "\\n" does not end in a single newline piece.
    """
    ids = [i for i in sp_model.encode("\n") if sp_model.id_to_piece(i) != SPIECE_UNDERLINE]
    if len(ids) == 1 and sp_model.decode([ids[0]]).strip(" ") == "\n":
        return ids[0]
    byte_id = sp_model.piece_to_id(NEWLINE_BYTE_PIECE)
    if byte_id != sp_model.unk_id() and sp_model.is_byte(byte_id):
        return byte_id
    raise ValueError(f'"\\n" does not map to a single newline piece in this tokenizer.model: {ids}')


class InternLM2Tokenizer(PreTrainedTokenizer):
    """Slow (SentencePiece) InternLM2 tokenizer; see the module docstring for behaviour.

    No fast tokenizer is provided: the official fast one decodes differently (its
    decoder strips one leading space and skips the special-token spacing above).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        sp_model_kwargs: dict[str, Any] | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        decode_with_prefix_space: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        if vocab_file is None or not os.path.isfile(vocab_file):
            where = kwargs.get("name_or_path") or "the checkpoint directory"
            expected = os.path.join(where, VOCAB_FILES_NAMES["vocab_file"]) if vocab_file is None else vocab_file
            raise FileNotFoundError(
                f"InternLM2Tokenizer needs the SentencePiece model file {expected!r}, which does not exist"
            )
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.decode_with_prefix_space = decode_with_prefix_space
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        try:
            self.sp_model.Load(vocab_file)
        except (OSError, RuntimeError) as err:
            raise OSError(f"cannot read SentencePiece model {vocab_file!r}: {err}") from err
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            sp_model_kwargs=sp_model_kwargs,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            decode_with_prefix_space=decode_with_prefix_space,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @classmethod
    def _from_pretrained(cls, resolved_vocab_files, pretrained_model_name_or_path, *args, **kwargs):
        # transformers 4.57 wraps __init__ in `except <protobuf DecodeError>`, which itself
        # raises ImportError when protobuf is absent and hides our message; so check first.
        vocab_file = resolved_vocab_files.get("vocab_file")
        if vocab_file is None or not os.path.isfile(vocab_file):
            expected = vocab_file or os.path.join(
                os.fspath(pretrained_model_name_or_path), VOCAB_FILES_NAMES["vocab_file"]
            )
            raise FileNotFoundError(
                f"InternLM2Tokenizer needs the SentencePiece model file {expected!r}, which does not exist"
            )
        try:
            spm.SentencePieceProcessor(model_file=vocab_file)
        except (OSError, RuntimeError) as err:
            raise OSError(f"cannot read SentencePiece model {vocab_file!r}: {err}") from err
        return super()._from_pretrained(resolved_vocab_files, pretrained_model_name_or_path, *args, **kwargs)

    # SentencePieceProcessor is a SWIG object; pickling goes through the serialized proto.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state):
        proto = state.pop("sp_model_proto")
        self.__dict__.update(state)
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.LoadFromSerializedProto(proto)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    @property
    def newline_token_id(self) -> int:
        """Id that a bare "\\n" encodes to (e.g. to stop generation at the end of a line)."""
        return newline_token_id(self.sp_model)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Same steps as the official tokenizer: SentencePiece decodes the runs between
        # special tokens, a space opens each run of special tokens, then the string is
        # cleaned up. The official code then prepends a space and drops the first
        # character, which cancel out (its prefix test compares pieces with ids).
        specials = set(self.all_special_tokens)
        out, run, prev_special = "", [], False
        for token in tokens:
            if token in specials:
                if not prev_special:
                    out += " "
                out += self.sp_model.decode(run) + token
                run, prev_special = [], True
            else:
                run.append(token)
                prev_special = False
        out += self.sp_model.decode(run)
        return self.clean_up_tokenization(out)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out = out + token_ids_1 + eos
        return out

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask = mask + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"Vocabulary path ({save_directory}) should be a directory")
        out_file = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        )
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_file) and os.path.isfile(self.vocab_file):
            copyfile(self.vocab_file, out_file)
        elif not os.path.isfile(self.vocab_file):
            with open(out_file, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (out_file,)


__all__ = ["InternLM2Tokenizer", "newline_token_id"]
