"""An OpenAI-compatible server for a stage-2 or instruction-tuned checkpoint, with dynamic batching:
``python -m blip2_internlm.serve --model-type tiny --checkpoint stage2.pth`` (docs/serve.md).

* ``cli``: the command line (the web demo's model flags and input limits), the model loaded once, uvicorn;
* ``server``: the FastAPI app and its routes, errors as OpenAI's;
* ``protocol``: the request as parsed, the responses, the streamed chunks;
* ``mapping``: from a request's messages to what the model computes (mode, settings, texts);
* ``images``: a request's image from a ``data:`` URI or a file under ``--image-root``;
* ``batcher``: the queue and the worker that runs compatible requests in one model call;
* ``engine``: a batch of work in one call of the model's own batched ``generate`` / ``predict_answers``;
* ``streaming``: a streaming request's text as its batch decodes it, and its server-sent events.
"""
