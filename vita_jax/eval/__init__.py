"""Evaluations that run a trained model end to end: `python -m vita_jax.eval.needle` (needle in
a generated video haystack) and `python -m vita_jax.eval.videoqa` (Video-MME, MLVU and
LongVideoBench multiple choice, in process or through an OpenAI-compatible server)."""
