"""`python -m vita_jax.generate`: stream an answer to a prompt with images or a video; report
prompt tokens, prefill time and decode speed.

    python -m vita_jax.generate --model=runs/demo --prompt="What colour is the shape?" \
        --image=runs/demo_data/demo/media/img_00000.png --seq_shards=8
"""

from __future__ import annotations

from vita_jax import generate as gen


def main(argv):
  import sys
  import time

  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)     # orbax/absl INFO lines would bury the answer
  f = flags.FLAGS
  model, tok = gen.load_for_inference(f.model, tokenizer=f.tokenizer, dtype=f.dtype)
  ids, pixels = gen.build_prompt(model, tok, f.prompt, f.image or (), f.video, f.max_frames)
  eos = int(model.config.tokens.eos_id)
  got, stamps, shown = [], [], [""]

  def on_token(_, tokens):
    stamps.append(time.perf_counter())
    got.append(int(tokens[0]))
    text = tok.decode([t for t in got if t != eos], skip_special_tokens=True)
    sys.stdout.write(text[len(shown[0]):])
    sys.stdout.flush()
    shown[0] = text

  timings: dict = {}
  gen.generate(model, ids, pixels, max_new_tokens=f.max_new_tokens, seq_shards=f.seq_shards,
               temperature=f.temperature, top_p=f.top_p, top_k=f.top_k, eos_id=eos, seed=f.seed,
               on_token=on_token, timings=timings)
  # The first decode step includes its compilation: the rate is over the steps after it.
  rate = (f"decode {(len(stamps) - 2) / (stamps[-1] - stamps[1]):.1f} tokens/s"
          if len(stamps) > 2 else "too few tokens to time decode")
  tiles = 0 if pixels is None else len(pixels)
  print(f"\n[prompt {timings['prompt_tokens']} tokens ({tiles} tiles/frames, bucket "
        f"{timings['bucket']}, seq_shards={f.seq_shards}) | prefill {timings['prefill_s']:.2f} s "
        f"(incl. compile) | {len(got)} new tokens, {rate}]", flush=True)


def define_flags():
  from absl import flags
  flags.DEFINE_string("model", None, "training workdir or Hugging Face directory", required=True)
  flags.DEFINE_string("prompt", None, "the user's question", required=True)
  flags.DEFINE_multi_string("image", [], "image file(s), in order")
  flags.DEFINE_string("video", "", "video file or directory of frames")
  flags.DEFINE_integer("max_frames", 64, "at most this many video frames (1 fps)")
  flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate at most")
  flags.DEFINE_integer("seq_shards", 1, "devices the prompt (and its KV cache) is sharded over")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy")
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
  flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)")
  flags.DEFINE_integer("seed", 0, "sampling seed")
  flags.DEFINE_string("tokenizer", "", "tokenizer directory (default: the model's)")
  flags.DEFINE_string("dtype", None, "compute dtype override, e.g. float32")


if __name__ == "__main__":
  from vita_jax import cli
  define_flags()
  cli.run(main)
