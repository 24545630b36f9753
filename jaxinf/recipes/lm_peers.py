"""Peer language models: the same weights in jaxinf and in the original library, side by side.

    peer, (model, params), batches = build_peer("llama", config, folder, seed=1)
    peer(prompts, n)            # the library's greedy continuation, new tokens [B, n]

A peer gets random weights at decisive scales (clear argmaxes, so greedy decoding is comparable
token for token), saved in the library's own format and read back into jaxinf through the real
converters (`jaxinf.checkpoints`):

- `llama`, `mamba`: Hugging Face transformers' `LlamaForCausalLM` / `MambaForCausalLM`, greedy
  `generate(..., do_sample=False, use_cache=True)`;
- `rwkv7`: BlinkDL's `rwkv` package (its x070 inference code, `RWKV(..., "cpu fp32")`), its
  `forward` with state one token at a time; the weights are an RWKV-LM x070 state dict
  (`rwkv_state_dict`), saved as .pth for the package and as safetensors for jaxinf.

torch, transformers and rwkv are imported only when a peer is built.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

PEERS = ("llama", "mamba", "rwkv7")
# the jaxinf family each peer's config comes from
PEER_FAMILY = {"llama": "transformer", "mamba": "mamba", "rwkv7": "rwkv7"}
PEER_LIBRARY = {"llama": "transformers", "mamba": "transformers", "rwkv7": "rwkv package"}


def _randomize(module, seed: int) -> None:
  """Random weights at decisive scales (clear argmaxes, so greedy decoding is comparable)."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      r = torch.randn(p.shape, generator=g)
      if name.endswith("A_log"):
        p.copy_(r.clamp(-2, 2))
      elif name.endswith("dt_proj.bias"):
        p.copy_(-2.0 + r)
      elif "norm" in name and p.ndim == 1:
        p.copy_(1.0 + 0.2 * r)
      elif "embed" in name:
        p.copy_(r)
      elif p.ndim == 1:
        p.copy_(0.3 * r)
      else:
        p.copy_(r / math.sqrt(p[0].numel()))


def build_peer(name: str, family_cfg, folder: Path, seed: int):
  """(peer generate(prompts [B, T] np, n) -> new tokens [B, n], jaxinf (model, params), batch
  sizes the peer supports or None for any). Weights travel the real converter path; `family_cfg`
  is the config of the jaxinf family `PEER_FAMILY[name]`."""
  if name not in PEERS:
    raise ValueError(f"name: unknown peer {name!r}; known: {list(PEERS)}")
  import torch

  from jaxinf.checkpoints import transformers_lm
  folder.mkdir(parents=True, exist_ok=True)
  if name in ("llama", "mamba"):
    import transformers
    c = family_cfg
    if name == "llama":
      hf_cfg = transformers.LlamaConfig(
          vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.mlp_hidden,
          num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
          num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
          tie_word_embeddings=c.tie_embeddings, max_position_embeddings=c.max_len,
          rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
      hf = transformers.LlamaForCausalLM(hf_cfg)
    else:
      hf_cfg = transformers.MambaConfig(
          vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
          state_size=c.state_size, expand=c.expand, conv_kernel=c.conv_kernel,
          time_step_rank=c.dt_rank, layer_norm_epsilon=c.norm_eps, use_bias=c.use_bias,
          use_conv_bias=c.use_conv_bias, tie_word_embeddings=c.tie_embeddings)
      hf = transformers.MambaForCausalLM(hf_cfg)
    hf.eval()
    _randomize(hf, seed)
    hf.save_pretrained(folder)
    load = transformers_lm.load_llama if name == "llama" else transformers_lm.load_mamba
    ours = load(folder)

    def peer(prompts: np.ndarray, n: int) -> np.ndarray:
      ids = torch.from_numpy(prompts.astype(np.int64))
      with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                          eos_token_id=None)
      return out[:, prompts.shape[1]:].numpy()

    return peer, ours, None

  # the rwkv package: BlinkDL's own x070 inference code; it reads .pth only, jaxinf safetensors
  os.environ["RWKV_V7_ON"] = "1"
  os.environ.setdefault("RWKV_JIT_ON", "1")
  os.environ["RWKV_CUDA_ON"] = "0"
  import safetensors.torch
  from rwkv.model import RWKV

  from jaxinf.checkpoints.rwkv import load_rwkv7
  sd = rwkv_state_dict(family_cfg, seed)
  torch.save(sd, folder / "model.pth")
  safetensors.torch.save_file(sd, str(folder / "model.safetensors"))
  ref = RWKV(model=str(folder / "model"), strategy="cpu fp32")
  ours = load_rwkv7(folder / "model.safetensors")

  def peer(prompts: np.ndarray, n: int) -> np.ndarray:
    (prompt,) = prompts  # batch 1 only: the package's forward carries one sequence's state
    out, state = ref.forward([int(t) for t in prompt], None)
    toks = []
    for _ in range(n):
      toks.append(int(torch.argmax(out)))
      out, state = ref.forward([toks[-1]], state)
    return np.asarray([toks])

  return peer, ours, (1,)


def rwkv_state_dict(cfg, seed: int) -> dict:
  """An RWKV-LM x070 state dict of `cfg`'s shapes with random weights of realistic scale."""
  import torch

  g = torch.Generator().manual_seed(seed)
  rn = lambda *shape, std=1.0: torch.randn(*shape, generator=g) * std
  ru = lambda *shape, lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand(*shape, generator=g)
  v, c, h, n, f = cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.head_size, cfg.ffn_dim
  sd = {"emb.weight": rn(v, c), "blocks.0.ln0.weight": ru(c, lo=0.5, hi=1.5),
        "blocks.0.ln0.bias": rn(c, std=0.1), "ln_out.weight": ru(c, lo=0.5, hi=1.5),
        "ln_out.bias": rn(c, std=0.1), "head.weight": rn(v, c, std=c ** -0.5)}
  lora = dict(w=cfg.decay_lora, a=cfg.a_lora, v=cfg.v_lora, g=cfg.gate_lora)
  for i in range(cfg.n_layers):
    p = f"blocks.{i}."
    for ln in ("ln1", "ln2"):
      sd[p + ln + ".weight"] = ru(c, lo=0.5, hi=1.5)
      sd[p + ln + ".bias"] = rn(c, std=0.1)
    for m in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
      sd[p + "att." + m] = ru(1, 1, c)
    sd[p + "att.w0"] = ru(1, 1, c, lo=-3.0, hi=1.0)
    sd[p + "att.a0"] = rn(1, 1, c, std=0.5)
    sd[p + "att.v0"] = rn(1, 1, c, std=0.5)
    for name, r in lora.items():
      sd[p + f"att.{name}1"] = rn(c, r, std=0.3)
      sd[p + f"att.{name}2"] = rn(r, c, std=0.3)
    sd[p + "att.k_k"] = ru(1, 1, c, lo=0.5, hi=1.5)
    sd[p + "att.k_a"] = ru(1, 1, c, lo=0.5, hi=1.5)
    sd[p + "att.r_k"] = rn(h, n, std=0.3)
    for lin in ("receptance", "key", "value", "output"):
      sd[p + f"att.{lin}.weight"] = rn(c, c, std=c ** -0.5)
    sd[p + "att.ln_x.weight"] = ru(c, lo=0.5, hi=1.5)
    sd[p + "att.ln_x.bias"] = rn(c, std=0.1)
    sd[p + "ffn.x_k"] = ru(1, 1, c)
    sd[p + "ffn.key.weight"] = rn(f, c, std=c ** -0.5)
    sd[p + "ffn.value.weight"] = rn(c, f, std=f ** -0.5)
  return sd
