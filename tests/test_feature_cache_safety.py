"""The feature cache across jobs and disks: two jobs building one store build it once (the second
waits for the first's lock, then reuses its store); leftovers of dead builds are removed; a build
that does not fit the free space is refused before it writes; a disk that fills up anyway fails
the build with an error naming the shard, never a signal, and leaves nothing a later run opens.

Builders run in fresh interpreters (their own locks, their own signals); each loads the tiny
model under the same seed as the ``model`` fixture, so all share one content hash."""

import fcntl
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import SMALL_SHAPES
from spec_helpers import REPO, run_python

GENERATOR = SMALL_SHAPES

BUILDER = """
import logging, os, sys
import numpy as np, torch
import blip2_internlm  # noqa: F401
from lavis.models import load_model_and_preprocess
from lavis.processors.blip_processors import BlipCaptionProcessor, BlipImageEvalProcessor
from blip2_internlm import feature_cache
from blip2_internlm.datasets.builders import ShapesCaptionDataset

root, store, out = sys.argv[1:4]
prefix = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""


class Say(logging.Handler):
    def emit(self, record):
        sys.stdout.write(prefix + record.getMessage() + "\\n")  # LAVIS silences print() on ranks other than 0
        sys.stdout.flush()


logging.getLogger(feature_cache.__name__).addHandler(Say())
logging.getLogger(feature_cache.__name__).setLevel(logging.DEBUG)
torch.manual_seed(0)
model = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)[0]
annotations = [f"{root}/annotations/caption_zh_train.json", f"{root}/annotations/caption_zh_train_gt.json"]
dataset = ShapesCaptionDataset(BlipImageEvalProcessor(64), BlipCaptionProcessor(), root, annotations)
"""

BUILD_AND_READ = (
    BUILDER
    + """
if "RANK" in os.environ:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    feature_cache.LOCK_POLL_SECONDS = 0.1
store = feature_cache.FeatureStore.build(model, dataset, store, dtype="fp32", batch_size=5)
read = np.stack([store.features(i).numpy() for i in range(store.num_images)])
np.save(f"{out}{os.environ.get('RANK', '')}.npy", read)
if "RANK" in os.environ:  # a gloo group left to interpreter shutdown can abort the rank
    dist.barrier()
    dist.destroy_process_group()
"""
)

DISK_FILLS_UP = (
    BUILDER
    + """
import resource, shutil, signal

if sys.argv[4] == "file size limit":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
else:  # a filesystem that reports free space it will not give (a quota, another writer)
    real = shutil.disk_usage
    shutil.disk_usage = lambda path: real(path)._replace(free=2**40)
feature_cache.FeatureStore.build(model, dataset, store, views=2, dtype="fp32", batch_size=5)
"""
)


@pytest.fixture(scope="module")
def model(tiny_eval_model):
    return tiny_eval_model


@pytest.fixture(scope="module")
def data_root(small_shapes_root):
    return small_shapes_root


def caption_train(root):
    from lavis.processors.blip_processors import BlipCaptionProcessor, BlipImageEvalProcessor

    from blip2_internlm.datasets.builders import ShapesCaptionDataset

    files = [f"{root}/annotations/caption_zh_train.json", f"{root}/annotations/caption_zh_train_gt.json"]
    return ShapesCaptionDataset(BlipImageEvalProcessor(64), BlipCaptionProcessor(), root, files)


def direct_features(model, dataset):
    from blip2_internlm.feature_cache import vit_features

    return np.stack([vit_features(model, dataset[i]["image"][None])[0].numpy() for i in range(len(dataset))])


class Job:
    """A process whose stdout lines are read while it runs; killed with its children if left running."""

    def __init__(self, *args, stderr):
        self.process = subprocess.Popen(
            [sys.executable, *map(str, args)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
        self.lines, self.seen = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text, times=1):
        """Read lines until ``text`` has appeared in ``times`` of them; fails if the process ends first."""
        while sum(text in line for line in self.seen) < times:
            line = self.lines.get(timeout=300)  # a hung process fails the spec instead of hanging it
            assert line is not None, f"ended without printing {text!r}:\n" + "\n".join(self.seen)
            self.seen.append(line)

    def finish(self):
        """All the lines it printed, once it has exited with status 0."""
        while (line := self.lines.get(timeout=300)) is not None:
            self.seen.append(line)
        assert self.process.wait(timeout=60) == 0, "\n".join(self.seen)
        return self.seen

    def kill(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def jobs():
    started = []
    yield started
    for job in started:
        job.kill()


def test_two_jobs_building_one_store_at_once_build_it_once_and_every_rank_reads_the_vit_features(
    model, data_root, tmp_path, jobs
):
    from blip2_internlm.feature_cache import FeatureStore, lock_path, tensors_digest

    store, script = tmp_path / "store", tmp_path / "build_and_read.py"
    script.write_text(BUILD_AND_READ)
    with open(lock_path(store), "a") as held:
        # Both jobs start while the lock is taken, so both must wait and then race for it.
        fcntl.flock(held, fcntl.LOCK_EX)
        with open(tmp_path / "one.err", "w") as one_err, open(tmp_path / "two.err", "w") as two_err:
            one_rank = Job("-c", BUILD_AND_READ, data_root, store, tmp_path / "one", stderr=one_err)
            two_ranks = Job(
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                script,
                data_root,
                store,
                tmp_path / "two",
                stderr=two_err,
            )
        jobs += [one_rank, two_ranks]
        one_rank.wait_for("waiting for it")
        two_ranks.wait_for("rank 0: Feature cache: another job is building")
        # the waiting rank 0 keeps its rank 1, which waits in a collective with a timeout, informed
        two_ranks.wait_for("rank 0: Feature cache: still waiting", times=3)
    logs = ["\n".join(job.finish()) for job in jobs]

    assert sum(log.count("Feature cache: building") for log in logs) == 1, logs
    reused = next(log for log in logs if "Feature cache: building" not in log)
    assert "reusing" in reused and "another job built while this one waited" in reused
    assert sorted(path.name for path in tmp_path.glob("store*")) == ["store", "store.lock"]  # no partial left
    # the jobs built the tiny model as this process did, so their features compare with its ViT's
    vit = tensors_digest([("visual_encoder", model.visual_encoder)])
    assert FeatureStore.open(store).header["identity"]["vit"] == vit
    expected = direct_features(model, caption_train(data_root))
    read = [np.load(tmp_path / name) for name in ("one.npy", "two0.npy", "two1.npy")]
    assert all(np.array_equal(read[0], other) for other in read[1:])
    np.testing.assert_allclose(read[0], expected, rtol=0, atol=1e-6)


def test_partial_and_replaced_stores_left_by_dead_builds_are_removed_by_the_next_build(
    model, data_root, tmp_path, caplog
):
    from blip2_internlm.feature_cache import FeatureStore

    caplog.set_level(logging.INFO, logger="blip2_internlm.feature_cache")
    leftovers = ["store.partial", "store.partial-otherhost-4242-0badc0de", "store.old-1234abcd"]
    for name in [*leftovers, "store-val.partial-otherhost-4242-0badc0de"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard-00000-of-00001.npy").write_bytes(b"half written")
    built = FeatureStore.build(model, caption_train(data_root), tmp_path / "store", dtype="fp32")
    assert built.num_images == 12
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "store",
        "store-val.partial-otherhost-4242-0badc0de",
        "store.lock",
    ]  # another store's partial is kept
    for name in leftovers:
        assert f"removing {tmp_path / name}" in caplog.text


def test_a_build_larger_than_the_free_space_is_refused_before_writing_saying_needed_and_available_bytes(
    model, data_root, tmp_path, monkeypatch
):
    from blip2_internlm import feature_cache
    from blip2_internlm.feature_cache import FeatureCacheError, FeatureStore, vit_features

    dataset, store = caption_train(data_root), tmp_path / "store"
    tokens, width = vit_features(model, dataset[0]["image"][None]).shape[1:]
    features_bytes = 12 * 2 * tokens * width * 4  # images x views x tokens x width x fp32
    real = feature_cache.shutil.disk_usage

    def free(available):
        monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: real(path)._replace(free=available))

    free(features_bytes)
    with pytest.raises(FeatureCacheError) as refused:
        FeatureStore.build(model, dataset, store, views=2, dtype="fp32")
    message = str(refused.value)
    needed, available = map(int, re.search(r"needs (\d+) bytes .* has (\d+) bytes", message).groups())
    assert str(store) in message and available == features_bytes
    assert features_bytes < needed <= features_bytes + 3 * 4096  # + the .npy and json headers, block-rounded
    assert sorted(path.name for path in tmp_path.iterdir()) == ["store.lock"]  # no shard, no partial

    free(needed)  # exactly what it asked for is enough
    assert FeatureStore.build(model, dataset, store, views=2, dtype="fp32").num_images == 12


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (needs the right to mount)."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command to make a small tmpfs")
    if result.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("filling", ["file size limit", "full tmpfs"])
def test_a_disk_filling_up_during_the_build_fails_naming_the_shard_without_a_signal_and_leaves_no_store(
    model, data_root, tmp_path, filling, request
):
    from blip2_internlm.feature_cache import FeatureCacheError, FeatureStore

    # 12 images x 2 views of fp32 features: 399 kB, over the 100 kB limit and the 256 KiB tmpfs
    where = request.getfixturevalue("small_tmpfs") if filling == "full tmpfs" else tmp_path
    store = where / "store"
    result = run_python("-c", DISK_FILLS_UP, data_root, store, "-", filling, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]  # an exception; a signal gives a negative status
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("blip2_internlm.feature_cache.FeatureCacheError: ")
    assert re.search(rf"{re.escape(str(store))}\.partial-[^/]+/shard-00000-of-00001\.npy", error), error
    assert ("File too large" if filling == "file size limit" else "No space left on device") in error
    assert sorted(path.name for path in where.iterdir()) == ["store.lock"]  # no store, no partial directory
    with pytest.raises(FeatureCacheError, match="no store"):
        FeatureStore.open(store)
