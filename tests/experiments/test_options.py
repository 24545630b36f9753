"""Every experiment refuses a bad option by name as its command line is parsed, before anything is
loaded, trained or compiled (`experiments.common.Checked`); good options, the defaults and the
`--smoke` sizes still parse, and an option given beside `--smoke` is kept, never dropped.

Nothing here traces or compiles: the configs check themselves on construction.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re

import pytest

from experiments import common
from tests.bad_input import raises_before_tracing

EXPERIMENTS = ("quickstart", "sampler_pareto", "train_dit", "lm_families", "speculative",
               "mirostat", "adaptive_decoding", "inference_scaling", "sample_dit_imagenet",
               "sharded_sampling", "scaling", "train_digits_classifier", "bench_kernels",
               "roofline", "kv_compression", "bench_decode", "quantization")


def module(name: str):
  return importlib.import_module(f"experiments.{name}")  # per test: one broken import fails one


def config_type(name: str):
  mod = module(name)
  return mod.BenchConfig if name == "bench_kernels" else mod.Config


# (experiment, command line, what the error must name): the examples first, then at least
# one option of every kind (choice, count, finite number, pair, nested group) per experiment
BAD_OPTIONS = [
    ("quickstart", ["--spacing", "bogus"], r"^spacing: .*'bogus'.*'leading'"),
    ("quickstart", ["--samplers", "ddim", "50", "foo", "5"], r"^samplers: .*'foo'"),
    ("quickstart", ["--samplers", "ddim", "1001"], r"^samplers: .*steps"),
    ("quickstart", ["--samplers", "lcm", "4"], r"^samplers: .*spacing"),  # lcm takes no spacing
    ("quickstart", ["--samplers"], r"^samplers: "),
    ("quickstart", ["--guidance-scale", "nan"], r"^guidance_scale: "),
    ("quickstart", ["--guidance-scale", "inf"], r"^guidance_scale"),
    ("quickstart", ["--seed", "-1"], r"^seed: .*>= 0"),
    ("quickstart", ["--samples-per-class", "0"], r"^samples_per_class: .*>= 1|\[1, 179\]"),
    ("quickstart", ["--samples-per-class", "180"], r"^samples_per_class.*179"),
    ("quickstart", ["--sweep-sampler", "ddim", "0"], r"^sweep_sampler: .*steps"),
    ("quickstart", ["--sweep-scales", "1", "nan"], r"^sweep_scales"),
    ("quickstart", ["--dit.model", "DiT-foo", "--smoke"], r"model: unknown DiT config 'DiT-foo'"),
    ("quickstart", ["--dit.model", "DiT-XL/2"], r"model: 'DiT-XL/2' takes"),  # not digits-sized
    ("quickstart", ["--dit.beta-schedule", "cosine"], r"beta_schedule: "),
    ("quickstart", ["--dit.train.steps", "0"], r"steps: "),
    ("quickstart", ["--dit.train.optimizer.learning-rate", "nan"], r"learning_rate"),
    ("sampler_pareto", ["--samples-per-class", "0"], r"^samples_per_class"),
    ("sampler_pareto", ["--cache-steps", "1001"], r"^cache_steps"),
    ("sampler_pareto", ["--cache-intervals", "2", "0"], r"^cache_intervals"),
    ("sampler_pareto", ["--learn-rounds", "0"], r"^learn_rounds"),
    ("sampler_pareto", ["--peer-guidance", "nan"], r"^peer_guidance"),
    ("sampler_pareto", ["--peer-batch", "1001"], r"^peer_batch"),
    ("sampler_pareto", ["--seed", "-1"], r"^seed: "),
    ("sampler_pareto", ["--few-step.teacher-steps", "0"], r"teacher_steps"),
    ("sampler_pareto", ["--few-step.slim-num-heads", "3"], r"slim_hidden_size"),
    ("sampler_pareto", ["--few-step.coupling.guidance-scale", "nan"], r"guidance_scale"),
    ("sampler_pareto", ["--dit.model", "DiT-foo"], r"model: unknown DiT config"),
    ("train_dit", ["--model", "DiT-foo", "--smoke"], r"^model: unknown DiT config 'DiT-foo'"),
    ("train_dit", ["--model", "DiT-S/2"], r"^model: 'DiT-S/2' takes"),
    ("train_dit", ["--beta-schedule", "bogus"], r"^beta_schedule: "),
    ("train_dit", ["--train.steps", "0"], r"steps: "),
    ("train_dit", ["--train.optimizer.grad-clip", "-1"], r"grad_clip"),
    ("train_dit", ["--out-dir", ""], r"^out_dir"),
    ("lm_families", ["--families", "gpt"], r"^families: .*'gpt'"),
    ("lm_families", ["--families"], r"^families: "),
    ("lm_families", ["--peers", "gpt2"], r"^peers: .*'gpt2'"),
    ("lm_families", ["--mamba-train-impl", "cuda"], r"^mamba_train_impl"),
    ("lm_families", ["--corpus-bytes", "0"], r"^corpus_bytes"),
    ("lm_families", ["--prefill-lengths", "64", "0"], r"^prefill_lengths"),
    ("lm_families", ["--decode-batches"], r"^decode_batches"),
    ("lm_families", ["--train.seq-len", "0"], r"seq_len"),
    ("lm_families", ["--seed", "-1"], r"^seed: "),
    ("speculative", ["--samplers", "hot"], r"^samplers: .*'hot'"),
    ("speculative", ["--sweep-drafts", "gpt"], r"^sweep_drafts: .*'gpt'"),
    ("speculative", ["--sweep-drafts"], r"^sweep_drafts: "),
    ("speculative", ["--family-drafts", "mamba-2m"], r"^family_drafts: "),
    ("speculative", ["--recurrent-target", "target"], r"^recurrent_target"),
    ("speculative", ["--gammas", "2", "0"], r"^gammas: "),
    ("speculative", ["--lookahead-ngram", "1"], r"^lookahead_ngram"),
    ("speculative", ["--medusa-train.steps", "0"], r"steps: "),
    ("speculative", ["--fastdraft-train.optimizer.weight-decay", "-1"], r"weight_decay"),
    ("mirostat", ["--family", "gpt"], r"^family: .*'gpt'"),
    ("mirostat", ["--taus", "1.0", "-1"], r"^taus: "),
    ("mirostat", ["--taus", "inf"], r"^taus"),
    ("mirostat", ["--v1-tau", "0"], r"^v1_tau"),
    ("mirostat", ["--top-p", "1.5"], r"^top_p: "),
    ("mirostat", ["--top-k", "0"], r"^top_k: "),
    ("mirostat", ["--window", "2000"], r"^window: "),  # longer than the 1024 tokens
    ("mirostat", ["--families.mamba-train-impl", "cuda"], r"mamba_train_impl"),
    ("mirostat", ["--families.seed", "-3"], r"seed"),
    ("adaptive_decoding", ["--small", "gpt"], r"^small: .*'gpt'"),
    ("adaptive_decoding", ["--large", "huge"], r"^large: "),
    ("adaptive_decoding", ["--thresholds", "1.0", "nan"], r"^thresholds"),
    ("adaptive_decoding", ["--thresholds"], r"^thresholds"),
    ("adaptive_decoding", ["--eager-threshold", "nan"], r"^eager_threshold"),
    ("adaptive_decoding", ["--window", "0"], r"^window: "),
    ("adaptive_decoding", ["--catch-up", "-1"], r"^catch_up"),
    ("adaptive_decoding", ["--alpha", "2"], r"^alpha: "),
    ("adaptive_decoding", ["--tokens", "0"], r"^tokens: "),
    ("inference_scaling", ["--ns", "3", "4"], r"^ns: .*divide"),
    ("inference_scaling", ["--ns", "0"], r"^ns: "),
    ("inference_scaling", ["--pf-ns"], r"^pf_ns"),
    ("inference_scaling", ["--pf-resampling", "stratified"], r"^pf_resampling"),
    ("inference_scaling", ["--pf-temperature", "0"], r"^pf_temperature"),
    ("inference_scaling", ["--temperature", "nan"], r"^temperature: "),
    ("inference_scaling", ["--hidden-size", "30"], r"^hidden_size"),
    ("inference_scaling", ["--task.max-operand", "0"], r"max_operand"),
    ("inference_scaling", ["--train.batch-size", "0"], r"batch_size"),
    ("inference_scaling", ["--scorer-train.steps", "0"], r"steps"),
    ("sample_dit_imagenet", ["--steps", "0"], r"^steps: "),
    ("sample_dit_imagenet", ["--source", "pickle"], r"^source: "),
    ("sample_dit_imagenet", ["--labels", "207", "-1"], r"^labels: "),
    ("sample_dit_imagenet", ["--guidance-scale", "nan"], r"^guidance_scale"),
    ("sample_dit_imagenet", ["--num-heads", "0"], r"^num_heads"),
    ("sample_dit_imagenet", ["--seed", "-1"], r"^seed: "),
    ("sharded_sampling", ["--dit", "DiT-foo"], r"^dit: .*'DiT-foo'"),
    ("sharded_sampling", ["--ddim-steps", "0"], r"^ddim_steps"),
    ("sharded_sampling", ["--lm-width", "36"], r"^lm_width"),
    ("sharded_sampling", ["--batch", "0"], r"^batch: "),
    ("sharded_sampling", ["--mesh.data", "0"], r"data: "),
    ("sharded_sampling", ["--distributed.coordinator", "nohost"], r"coordinator"),
    ("scaling", ["--devices", "1", "0"], r"^devices: "),
    ("scaling", ["--dit", "DiT-foo"], r"^dit: "),
    ("scaling", ["--batch", "6"], r"^batch: .*multiple"),  # 6 devices do not divide... 4 and 8
    ("scaling", ["--lm-heads", "3"], r"^lm_width"),
    ("scaling", ["--pcpp-fraction", "2"], r"^pcpp_fraction"),
    ("scaling", ["--warmup-steps", "0"], r"^warmup_steps"),
    ("scaling", ["--quality-per-class", "-1"], r"^quality_per_class"),
    ("train_digits_classifier", ["--train.steps", "0"], r"^train\.steps"),
    ("train_digits_classifier", ["--train.learning-rate", "nan"],
     r"^train\.learning_rate: "),
    ("train_digits_classifier", ["--train.max-shift", "8"], r"^train\.max_shift"),
    ("train_digits_classifier", ["--min-accuracy", "1.5"], r"^min_accuracy"),
    ("bench_kernels", ["--ops", "conv"], r"^ops: .*'conv'"),
    ("bench_kernels", ["--impls", "cuda"], r"^impls: "),
    ("bench_kernels", ["--ops"], r"^ops: "),
    ("bench_kernels", ["--lengths", "64", "0"], r"^lengths: "),
    ("bench_kernels", ["--dtype", "int8"], r"^dtype: "),
    ("bench_kernels", ["--dtype", "float99"], r"^dtype: "),
    ("bench_kernels", ["--repeats", "0"], r"^repeats: "),
    ("roofline", ["--models", "gpt-9b"], r"^models: .*'gpt-9b'"),
    ("roofline", ["--models"], r"^models: "),
    ("roofline", ["--devices", "a100"], r"^devices: .*'a100'"),
    ("roofline", ["--dtype", "float8"], r"^dtype: "),
    ("roofline", ["--batches", "1", "0"], r"^batches: "),
    ("roofline", ["--decode-steps", "600"], r"^decode_steps: "),
    ("roofline", ["--dit", "DiT-foo"], r"^dit: .*'DiT-foo'"),
    ("roofline", ["--dit-latent", "15"], r"^dit_latent: "),
    ("roofline", ["--dit-batch", "3"], r"^dit_batch: .*even"),
    ("roofline", ["--host-matmul", "8"], r"^host_matmul: "),
    ("kv_compression", ["--policies", "foo"], r"^policies: .*'foo'"),
    ("kv_compression", ["--budgets", "0"], r"^budgets: "),
    ("kv_compression", ["--key-len", "0"], r"^key_len"),
    ("bench_decode", ["--sizes", "7m"], r"^sizes: .*'7m'"),
    ("bench_decode", ["--batches", "0"], r"^batches: "),
    ("bench_decode", ["--new-tokens", "0"], r"^new_tokens"),
    ("quantization", ["--dit-formats", "int2"], r"^dit_formats: .*'int2'"),
    ("quantization", ["--lm-formats", "squeeze9"], r"^lm_formats: .*'squeeze9'"),
    ("quantization", ["--steps", "0"], r"^steps"),
]


def never(cfg):
  pytest.fail(f"the experiment ran with a bad option: {cfg}")


def test_every_experiment_is_probed():
  assert {name for name, _, _ in BAD_OPTIONS} == set(EXPERIMENTS)


@pytest.mark.parametrize("name,args,names", BAD_OPTIONS,
                         ids=[f"{n}:{' '.join(a)}" for n, a, _ in BAD_OPTIONS])
def test_bad_option_is_refused_by_name_as_parsed(name, args, names, capsys, monkeypatch):
  monkeypatch.setattr("sys.argv", [f"experiments/{name}.py", *args])
  with pytest.raises(SystemExit) as info:
    common.cli(never, config_type(name))  # exactly what `python -m experiments.<name>` runs
  assert info.value.code == 2
  err = capsys.readouterr().err
  # tyro prints "Error parsing <group>: <the config's message>" in a box: unwrap the box
  text = " ".join(line.strip(" │╭╮╰╯─") for line in err.splitlines())
  match = re.search(r"Error parsing \S+: (.*?)(?: For full helptext|$)", text)
  assert match, err
  message = re.sub(r"\s+", " ", re.sub(r"[-─]{5,}", "", match.group(1))).strip()
  # "samples_per_class (--samples-per-class): ..." names the field and the flag as typed
  flag = re.match(r"^([\w.]+) \((--[\w.-]+)\): ", message)
  if flag:
    assert flag.group(2) == "--" + flag.group(1).replace("_", "-"), message
    message = message.replace(flag.group(0), flag.group(1) + ": ", 1)
  assert re.search(names, message), message


# Built in code rather than parsed: the error type itself, raised before anything is traced
# (tyro turns a nested group's ValueError into its own message; here nothing is in between).
BAD_VALUES = [
    ("quickstart", dict(spacing="bogus"), ValueError, r"^spacing: "),
    ("quickstart", dict(samplers=(("ddim", 2.5),)), ValueError, r"^samplers: "),
    ("quickstart", dict(samplers=(("ddim", 10, 3),)), ValueError, r"^samplers"),
    ("quickstart", dict(guidance_scale=math.nan), ValueError, r"^guidance_scale"),
    ("quickstart", dict(guidance_scale="1.5"), ValueError, r"^guidance_scale"),
    ("quickstart", dict(seed=True), ValueError, r"^seed: "),
    ("quickstart", dict(smoke="no"), ValueError, r"^smoke: expected a bool"),
    ("quickstart", dict(progress=1), ValueError, r"^progress: "),
    ("quickstart", dict(samples_per_class=2.0), ValueError, r"^samples_per_class"),
    ("quickstart", dict(dit="DiT-digits"), ValueError, r"^dit: "),
    ("sampler_pareto", dict(learn_rounds=1.5), ValueError, r"^learn_rounds"),
    ("train_dit", dict(model=None), ValueError, r"^model: "),
    ("train_dit", dict(train=dict(steps=3)), ValueError, r"^train: "),
    ("lm_families", dict(families="mamba"), ValueError, r"^families: "),
    ("speculative", dict(samplers=("greedy", 3)), ValueError, r"^samplers: "),
    ("mirostat", dict(taus=(math.inf,)), ValueError, r"^taus: "),
    ("adaptive_decoding", dict(thresholds=(math.nan,)), ValueError, r"^thresholds: "),
    ("inference_scaling", dict(ns=(1, 2, 2.0)), ValueError, r"^ns: "),
    ("sample_dit_imagenet", dict(labels=(1, "cat")), ValueError, r"^labels: "),
    ("sharded_sampling", dict(checkpoint="yes"), ValueError, r"^checkpoint: "),
    ("scaling", dict(pcpp_fraction=math.inf), ValueError, r"^pcpp_fraction"),
    ("train_digits_classifier", dict(min_accuracy=math.nan), ValueError, r"^min_accuracy"),
    ("bench_kernels", dict(lengths=(64, 128.0)), ValueError, r"^lengths: "),
    ("roofline", dict(batches=(1, 64.0)), ValueError, r"^batches: "),
]


@pytest.mark.parametrize("name,options,error,names", BAD_VALUES,
                         ids=[f"{n}:{sorted(o)[0]}" for n, o, _, _ in BAD_VALUES])
def test_bad_value_in_code_is_a_named_error(name, options, error, names):
  with raises_before_tracing(error, names):
    config_type(name)(**options)


# Good, non-default options of every kind parse to the values given.
GOOD_OPTIONS = [
    ("quickstart", ["--spacing", "leading", "--samplers", "dpmsolver++", "20", "ddim", "1000",
                    "--guidance-scale", "0", "--seed", "3", "--samples-per-class", "179",
                    "--dit.model", "DiT-digits-sigma", "--sweep-scales"],
     dict(spacing="leading", samplers=(("dpmsolver++", 20), ("ddim", 1000)), guidance_scale=0.0,
          seed=3, samples_per_class=179, sweep_scales=())),
    ("sampler_pareto", ["--learn-rounds", "None", "--cache-steps", "1000"],
     dict(learn_rounds=None, cache_steps=1000)),
    ("train_dit", ["--model", "DiT-tiny", "--beta-schedule", "squaredcos_cap_v2"],
     dict(model="DiT-tiny", beta_schedule="squaredcos_cap_v2")),
    ("lm_families", ["--families", "mamba", "--peers"], dict(families=("mamba",), peers=())),
    ("speculative", ["--samplers", "t0.7", "--family-drafts"],
     dict(samplers=("t0.7",), family_drafts=())),
    ("mirostat", ["--family", "mamba", "--taus", "2.5"], dict(family="mamba", taus=(2.5,))),
    ("adaptive_decoding", ["--thresholds", "inf", "-inf", "1"],
     dict(thresholds=(math.inf, -math.inf, 1.0))),
    ("inference_scaling", ["--ns", "1", "3", "9"], dict(ns=(1, 3, 9))),
    ("sample_dit_imagenet", ["--source", "original", "--num-heads", "16", "--labels", "0"],
     dict(source="original", num_heads=16, labels=(0,))),
    ("sharded_sampling", ["--dit", "DiT-S/2", "--lm-width", "64"],
     dict(dit="DiT-S/2", lm_width=64)),
    ("scaling", ["--devices", "1", "3", "--batch", "6", "--quality-per-class", "0"],
     dict(devices=(1, 3), batch=6, quality_per_class=0)),
    ("train_digits_classifier", ["--train.max-shift", "0", "--min-accuracy", "0"],
     dict(min_accuracy=0.0)),
    ("bench_kernels", ["--ops", "wkv7", "--dtype", "bfloat16"],
     dict(ops=("wkv7",), dtype="bfloat16")),
    ("roofline", ["--models", "mamba-1m", "--devices", "tpu-v5e", "--dtype", "float32"],
     dict(models=("mamba-1m",), devices=("tpu-v5e",), dtype="float32")),
]


@pytest.mark.parametrize("name,args,expected", GOOD_OPTIONS, ids=[n for n, _, _ in GOOD_OPTIONS])
def test_good_options_parse(name, args, expected):
  cfg = common.parse(config_type(name), args)
  assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_defaults_and_smoke_sizes_are_valid(name):
  cls = config_type(name)
  assert common.parse(cls, []) == cls()
  smoked = smoke(name, cls(smoke=True))
  assert smoked != cls(smoke=True) and smoked.smoke  # the smoke sizes themselves passed check()


def smoke(name: str, cfg):
  """The experiment's `--smoke` config of `cfg` (bench_kernels keeps its table in `SMOKE`)."""
  mod = module(name)
  if name == "bench_kernels":
    return common.smoke_sized(cfg, dataclasses.replace(cfg, **mod.SMOKE), derived=())
  return mod.smoke_config(cfg)


def test_smoke_keeps_the_options_given_beside_it():
  from jaxinf.recipes.quickstart_dit import QuickstartDiT
  quickstart = module("quickstart")
  cfg = common.parse(quickstart.Config, ["--smoke", "--samples-per-class", "3",
                                         "--dit.model", "DiT-digits-sigma",
                                         "--dit.train.batch-size", "8", "--out-dir", "r/q"])
  smoked = quickstart.smoke_config(cfg)
  # given: kept; not given: smoke's sizes; derived from the given: <out_dir>_smoke
  assert smoked.samples_per_class == 3 and smoked.dit.model == "DiT-digits-sigma"
  assert smoked.dit.train.batch_size == 8 and smoked.dit.train.steps == 60
  assert smoked.samplers == (("ddpm", 20), ("ddim", 5)) and smoked.out_dir == "r/q_smoke"
  default = quickstart.smoke_config(quickstart.Config(smoke=True))
  assert default.dit == dataclasses.replace(
      QuickstartDiT(), model="DiT-tiny", train=dataclasses.replace(
          QuickstartDiT().train, steps=60, checkpoint_every=30, batch_size=32))
  # a nested value smoke derives from the given one (mirostat's families folder)
  mirostat = module("mirostat")
  fam = dataclasses.replace(mirostat.Config().families, out_dir="elsewhere")
  smoked = mirostat.smoke_config(mirostat.Config(smoke=True, families=fam, tokens=100))
  assert smoked.families.out_dir == "elsewhere_smoke" and smoked.families.tiny
  assert smoked.tokens == 100 and smoked.batch == 2


class Trained(Exception):
  pass


def test_train_dit_smoke_trains_the_model_given(monkeypatch, tmp_path):
  """`--model X --smoke` trains X (at smoke steps), not DiT-tiny in its place."""
  train_dit = module("train_dit")
  seen = {}

  def fake_train(out_dir, *, model_cfg, train_cfg, schedule, progress):
    seen.update(model_cfg=model_cfg, train_cfg=train_cfg)
    raise Trained

  monkeypatch.setattr(train_dit, "train_dit_on_digits", fake_train)
  cfg = common.parse(train_dit.Config, ["--model", "DiT-digits-sigma", "--smoke",
                                        "--out-dir", str(tmp_path)])
  with pytest.raises(Trained):
    train_dit.main(cfg)
  from jaxinf.models.dit import dit_config
  assert seen["model_cfg"] == dit_config("DiT-digits-sigma")
  assert seen["train_cfg"].steps == 40 and seen["train_cfg"].batch_size == 16
  with pytest.raises(Trained):
    train_dit.main(train_dit.Config(smoke=True, out_dir=str(tmp_path)))
  assert seen["model_cfg"] == dit_config("DiT-tiny")


def test_quickstart_knows_the_number_of_digits_images():
  from jaxinf.data import digits
  assert module("quickstart").DIGITS_IMAGES == len(digits.load_digits_images()[1])
