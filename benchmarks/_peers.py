"""The peers of the CPU benchmark suite (`cpu_suite.py`): how each model is built and driven.

A peer is one language model of the 125M class with random weights. Each peer class knows how to
- `build` its model in a dtype (fp32 or bf16 weights; training keeps fp32 weights and uses bf16 autocast);
- `prefill`: one forward over a prompt, no grad, producing the logits of the last position only;
- decode: `new_state` / `extend` (prefill a chunk into a batch-1 state) / `replicate` (an independent copy
  of that state for batch B) / `step` (one token per sequence, advancing the state);
- `train_loss`: the language-model loss for labels = inputs (the caller does backward and AdamW);
- account for itself: which parameters are read per generated token, how many FLOPs the sequence mixing
  takes, how much memory a measurement will need (`memory_estimate`), used for bounds and skip rules.

`PEERS` maps a name to its class. The official `xlstm` package's model and ours compute the same
function; `OfficialPeer` builds both with the same weights (the official weights converted with
`xlstm_hf.conversion.official`) because it builds its decode state with ours (see `OfficialPeer.replicate`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GPT2_VOCAB = 50257  # random prompt tokens are drawn from GPT-2's vocabulary, valid for every peer
GB = 1e9

# The official xLSTM[7:1] 125M config (vanilla sLSTM backend: the only one that runs on CPU). Our default
# xLSTMConfig() is the same model; `context_length` is set per run (the official model refuses longer inputs).
OFFICIAL_CONFIG = {
    "vocab_size": 50304,
    "embedding_dim": 768,
    "num_blocks": 24,
    "context_length": 2048,
    "slstm_at": [4, 12, 20],
    "tie_weights": False,
    "mlstm_block": {"mlstm": {"conv1d_kernel_size": 4, "qkv_proj_blocksize": 4, "num_heads": 4}},
    "slstm_block": {
        "slstm": {"backend": "vanilla", "num_heads": 4, "conv1d_kernel_size": 4,
                  "bias_init": "powerlaw_blockdependent"},
        "feedforward": {"proj_factor": 1.3, "act_fn": "gelu"},
    },
}

# transformers' own xLSTM (the 7B design: mLSTM-only blocks, each mLSTM layer followed by a gated FFN) at the
# 125M scale. With the 7B's proportions (qk 0.5, v 1.0, FFN 2.667) one block at width 768 has 7.2M parameters,
# so 12 blocks (24 sub-layers, like GPT-2's 12 attention + 12 MLP) give 164M with the untied 50304-row head;
# 24 blocks would be 250M. 4 heads: qk head dim 96, v head dim 192.
HF_XLSTM_CONFIG = {
    "vocab_size": 50304,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_heads": 4,
    "chunkwise_kernel": "chunkwise--native_autograd",
    "sequence_kernel": "native_sequence__native",
    "step_kernel": "native",
    "tie_word_embeddings": False,
}


def unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter once (tied ones are one tensor)."""
    return list({id(p): p for p in model.parameters()}.values())


class Peer:
    """Base class: the interface every peer implements, with the shared bookkeeping."""

    name = ""
    title = ""
    notes: list[str] = []
    #: the decode state is read and rewritten every step (recurrent) or only read (attention KV cache)
    recurrent = True
    #: prefill chunk used to build decode contexts (bounds the memory of quadratic peers)
    extend_chunk = 8192

    def __init__(self, max_len: int, run_max_len: int | None = None):
        self.max_len = max_len  # longest sequence any measurement of this worker needs
        self.run_max_len = max(max_len, run_max_len or 0)  # ... of the whole run (the same model in every worker)

    # ---- model ----
    def build(self, dtype: torch.dtype, train: bool = False) -> torch.nn.Module:
        raise NotImplementedError

    def input_embeddings(self, model) -> list[torch.Tensor]:
        """Lookup tables read one row per token (not matmul weights)."""
        return [model.get_input_embeddings().weight]

    def head_weight(self, model) -> torch.Tensor:
        return model.get_output_embeddings().weight

    def mixing_flops(self, model, T: int) -> float:
        """Forward FLOPs of the sequence mixing beyond the weight matmuls, for one sequence of length T."""
        return 0.0

    # ---- measurements ----
    def prefill(self, model, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def new_state(self, model):
        raise NotImplementedError

    def extend(self, model, state, ids: torch.Tensor):
        """Prefill `ids` (batch 1) into `state`; returns the state."""
        raise NotImplementedError

    def replicate(self, state, batch: int):
        """An independent copy of the batch-1 `state` with `batch` identical rows."""
        raise NotImplementedError

    def step(self, model, token: torch.Tensor, state):
        """One decode step: token (B, 1) -> state advanced by one token (logits are computed)."""
        raise NotImplementedError

    def state_bytes(self, state) -> int:
        raise NotImplementedError

    def train_loss(self, model, ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    # ---- accounting ----
    def profile(self, model) -> dict:
        """Parameter counts used by the bounds (see README: bound formulas)."""
        params = unique_parameters(model)
        total = sum(p.numel() for p in params)
        head = self.head_weight(model)
        lookup = sum(t.numel() for t in self.input_embeddings(model) if t is not head)
        width = self.input_embeddings(model)[0].shape[1]
        return {
            "params_total": total,
            "params_embedding_lookup": lookup,
            "params_head": head.numel(),
            # read per generated token: everything but the lookup tables (plus one row of each)
            "params_read_per_token": total - lookup + width * len(self.input_embeddings(model)),
            # weight-matmul parameters of the body (one multiply-add per parameter per token)
            "params_matmul_body": total - lookup - head.numel(),
        }

    def flops_per_sequence(self, model, T: int, prof: dict, all_logits: bool) -> float:
        """Forward FLOPs for one sequence of length T: 2 x body parameters per token + mixing + the head
        (on every position for training, on the last one for prefill)."""
        head_positions = T if all_logits else 1
        body = 2 * prof["params_matmul_body"] * T
        return body + self.mixing_flops(model, T) + 2 * prof["params_head"] * head_positions

    def predict_prefill_seconds(self, seconds: float, batch: int, T: int, flops: float,
                                new_batch: int, new_T: int, new_flops: float) -> float:
        """Time of a prefill predicted from a measured one: by the FLOP ratio."""
        return seconds * new_flops / flops

    def memory_estimate(self, what: str, batch: int, T: int, dtype: torch.dtype, n_params: int) -> float:
        """Rough peak RSS (bytes) of a worker doing this measurement, for the skip rule. The per-token
        constants were calibrated from measured peaks (VmHWM) of this suite's workers."""
        w = n_params * torch.finfo(dtype).bits // 8
        base = 0.6 * GB  # interpreter, torch, transformers
        if what == "train":  # fp32 weights, grads, two AdamW moments; activations, logits and their grads
            return base + 16 * n_params + batch * T * self.train_bytes_per_token
        if what == "prefill":
            return base + w + batch * T * self.prefill_bytes_per_token + self.quadratic_bytes(batch, T)
        # decode (T = the contexts held together): a batch-1 prefill of up to extend_chunk tokens; the batch-1
        # states and their batch copies (+10%: a KV cache grows by concatenation, one layer at a time)
        chunk = min(T, self.extend_chunk)
        kv = self.kv_bytes_per_token * torch.finfo(dtype).bits // 32
        prefill = chunk * self.prefill_bytes_per_token + self.quadratic_bytes(1, chunk)
        return base + w + prefill + 1.1 * (1 + batch) * T * kv

    # calibration constants (bytes per token), overridden per peer
    train_bytes_per_token = 5_000_000
    prefill_bytes_per_token = 150_000
    kv_bytes_per_token = 0  # fp32 decode-state growth with the context (attention KV cache)

    def quadratic_bytes(self, batch: int, T: int) -> float:
        """Memory of T x T matrices (quadratic forms), if any."""
        return 0.0


class HfCachePeer(Peer):
    """A model driven through `past_key_values` with a transformers-style cache (ours and GPT-2)."""

    def extend(self, model, state, ids):
        for chunk in ids.split(self.extend_chunk, dim=1):
            model(input_ids=chunk, past_key_values=state, use_cache=True, logits_to_keep=1)
        return state

    def replicate(self, state, batch):
        state = copy.deepcopy(state)
        if batch > 1:
            state.batch_repeat_interleave(batch)
        return state

    def step(self, model, token, state):
        model(input_ids=token, past_key_values=state, use_cache=True)
        return state


# --------------------------------------------------------------------------------------------------
# xlstm_hf (ours)
# --------------------------------------------------------------------------------------------------


class XlstmHfPeer(HfCachePeer):
    name = "xlstm_hf"
    title = "xlstm_hf xLSTM[7:1] (ours)"
    notes = ["xlstm_hf.xLSTMForCausalLM(xLSTMConfig()): 768 wide, 24 blocks, sLSTM at 4/12/20, untied head; "
             "PyTorch backend (chunkwise mLSTM, chunk 64)"]
    train_bytes_per_token = 3_000_000  # measured 2.5 MB (B=1, T=512; 4.7 MB before the recomputing backward)
    prefill_bytes_per_token = 130_000  # measured 110 kB (B=1, T=8192)

    def build(self, dtype, train=False):
        import xlstm_hf

        model = xlstm_hf.xLSTMForCausalLM(xlstm_hf.xLSTMConfig())
        return model.to(dtype)

    def mixing_flops(self, model, T):
        """Chunkwise mLSTM per head and token: q k^T and scores v inside the chunk (2 L (DK + DV)), reading
        the carried state q C and adding the chunk to it (4 DK DV). sLSTM recurrent matmuls are parameters."""
        c = model.config
        NH, D, L = c.mlstm_num_heads, c.mlstm_inner_dim // c.mlstm_num_heads, min(c.chunk_size, T)
        return c.num_mlstm_blocks * NH * T * (2 * L * (D + D) + 4 * D * D)

    def prefill(self, model, ids):
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    def new_state(self, model):
        import xlstm_hf

        return xlstm_hf.xLSTMCache(model.config)

    def state_bytes(self, state):
        return sum(t.nbytes for s in state.states if s for t in s.values() if t is not None)


# --------------------------------------------------------------------------------------------------
# the official xlstm package
# --------------------------------------------------------------------------------------------------


def build_official(context_length: int = 2048):
    """The official xLSTMLMModel of OFFICIAL_CONFIG (random weights, official init), in eval mode."""
    from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig, sLSTMLayerConfig,
                       xLSTMLMModel, xLSTMLMModelConfig)

    c = {**OFFICIAL_CONFIG, "context_length": context_length}
    cfg = xLSTMLMModelConfig(
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(**c["mlstm_block"]["mlstm"])),
        slstm_block=sLSTMBlockConfig(slstm=sLSTMLayerConfig(**c["slstm_block"]["slstm"]),
                                     feedforward=FeedForwardConfig(**c["slstm_block"]["feedforward"])),
        **{k: v for k, v in c.items() if k not in ("mlstm_block", "slstm_block")},
    )
    model = xLSTMLMModel(cfg)
    model.reset_parameters()
    return model.eval()


def official_to_ours(official):
    """Our model with the official model's weights (in memory, via xlstm_hf.conversion.official)."""
    import xlstm_hf  # noqa: F401 (registers the model type)
    from xlstm_hf.conversion.official import config_from_official, convert_state_dict

    config, layout = config_from_official({**OFFICIAL_CONFIG, "context_length": official.config.context_length})
    sd = convert_state_dict(official.state_dict(), config, layout)
    with torch.device("meta"):
        ours = xlstm_hf.xLSTMForCausalLM(config)
    ours.load_state_dict(sd, strict=True, assign=True)
    return ours.eval()


def ours_cache_to_official_state(cache, config, dtype) -> dict:
    """Our xLSTMCache -> the official `step()` state (same model, same weights).

    Official layout per block `block_{j}`: mLSTM {"mlstm_state": (C (B,NH,DK,DV), n (B,NH,DK,1),
    m (B,NH,1,1)), "conv_state": ((B,K,F),)}; sLSTM {"conv_state": ((B,K,H),), "slstm_state": (4,B,H) =
    h, c, n, m}. The official conv window holds the last K inputs of which the step drops the oldest, ours
    the last K-1: a zero row is prepended. Our stabiliser m starts at -inf and the official one at 0; after
    the first token both represent the same state (outputs do not depend on m).
    """
    def window(w):
        return (torch.cat([w.new_zeros(w.shape[0], 1, w.shape[2]), w], dim=1).to(dtype),)

    state = {}
    for j, s in enumerate(cache.states):
        if j in config.slstm_at:
            B = s["h"].shape[0]
            hcnm = torch.stack([s[key].reshape(B, -1) for key in "hcnm"]).to(dtype)
            state[f"block_{j}"] = {"conv_state": window(s["conv"]), "slstm_state": hcnm}
        else:
            mlstm = (s["C"].clone(), s["n"][..., None].clone(), s["m"][..., None, None].clone())
            state[f"block_{j}"] = {"mlstm_state": tuple(t.to(dtype) for t in mlstm), "conv_state": window(s["conv"])}
    return state


class OfficialPeer(Peer):
    name = "official"
    title = "official xlstm 2.0.6 xLSTMLMModel"
    notes = [
        "official xlstm.xLSTMLMModel, same config and weights as xlstm_hf (converted), vanilla sLSTM backend "
        "(the CUDA one does not run on CPU); forward = quadratic parallel mLSTM; decode = model.step()",
        "official decode: its forward() returns no state, and building an 8k state with step() takes >10 min, "
        "so the context is prefilled by xlstm_hf (same weights) and its cache converted to the official "
        "step() state; checked against a step()-built state at the first context",
        "official prefill: the block stack + LM head on the last position (forward() returns all logits); "
        "context_length = the worker's longest sequence (each mLSTM cell keeps a context_length^2 causal mask: "
        "1.4 GB at 8k, 5.5 MB at 512)",
    ]
    train_bytes_per_token = 4_800_000  # measured 4.3 MB
    prefill_bytes_per_token = 150_000

    def build(self, dtype, train=False):
        official = build_official(context_length=self.max_len)
        # our model with the same weights builds the decode states (see replicate)
        self.twin = None if train else official_to_ours(official).to(dtype)
        return official.to(dtype)

    def memory_estimate(self, what, batch, T, dtype, n_params):
        masks = 21 * self.max_len**2  # every mLSTM cell keeps a context_length^2 bool causal mask
        if what == "decode":  # two models; the context is prefilled by ours (chunkwise: no T x T matrices)
            w = n_params * torch.finfo(dtype).bits // 8
            return 0.6 * GB + 2 * w + masks + min(T, self.extend_chunk) * XlstmHfPeer.prefill_bytes_per_token
        return super().memory_estimate(what, batch, T, dtype, n_params) + masks

    def input_embeddings(self, model):
        return [model.token_embedding.weight]

    def head_weight(self, model):
        return model.lm_head.weight

    def mixing_flops(self, model, T):
        """The official forward runs the quadratic parallel mLSTM: q k^T and scores v over the full T x T
        matrix (masked, not skipped), per head 2 T (DK + DV) per token."""
        c = model.config
        heads = c.mlstm_block.mlstm.num_heads
        inner = c.mlstm_block.mlstm._inner_embedding_dim
        n_mlstm = c.num_blocks - len(c.slstm_at)
        return n_mlstm * heads * T * 2 * T * 2 * (inner // heads)

    def quadratic_bytes(self, batch, T):
        # the parallel form keeps about ten (B, NH, T, T) fp32-sized matrices alive (measured: 13.1 GB peak
        # at B=1, T=8192)
        return 10 * batch * 4 * T * T * 4

    def predict_prefill_seconds(self, seconds, batch, T, flops, new_batch, new_T, new_flops):
        """The T x T matrices dominate (memory-bound elementwise work that FLOPs do not count): time
        scales with B T^2."""
        return seconds * max(new_flops / flops, new_batch * new_T**2 / (batch * T**2))

    def prefill(self, model, ids):
        x = model.xlstm_block_stack(model.emb_dropout(model.token_embedding(ids)))
        return model.lm_head(x[:, -1:])

    def train_loss(self, model, ids):
        x = model.xlstm_block_stack(model.emb_dropout(model.token_embedding(ids)))
        logits = model.lm_head(x)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    # decode: the state is built by our twin model (same weights), then converted
    def new_state(self, model):
        return XlstmHfPeer.new_state(self, self.twin)

    def extend(self, model, state, ids):
        return XlstmHfPeer.extend(self, self.twin, state, ids)

    def replicate(self, state, batch):
        ours = XlstmHfPeer.replicate(self, state, batch)
        return ours_cache_to_official_state(ours, self.twin.config, next(self.twin.parameters()).dtype)

    def step(self, model, token, state):
        _, state = model.step(token, state)
        return state

    def state_bytes(self, state):
        return sum(t.nbytes for block in state.values() for part in block.values()
                   for t in (part if isinstance(part, tuple) else (part,)))

    def check_state_conversion(self, model, ids: torch.Tensor) -> float:
        """Max |logit difference| of the next step between a state built by official `step()` over `ids`
        (batch 1) and one converted from our cache: ~0 when the conversion is right."""
        state = None
        for t in range(ids.shape[1]):
            _, state = model.step(ids[:, t:t + 1], state)
        converted = self.replicate(self.extend(model, self.new_state(model), ids), 1)
        probe = ids[:, :1]
        ref, _ = model.step(probe, state)
        got, _ = model.step(probe, converted)
        return float((ref.float() - got.float()).abs().max())


# --------------------------------------------------------------------------------------------------
# transformers GPT-2
# --------------------------------------------------------------------------------------------------


class Gpt2Peer(HfCachePeer):
    name = "gpt2"
    title = "transformers GPT-2 124M"
    recurrent = False
    extend_chunk = 1024  # attention scores of a chunk: 12 heads x 1024 x context
    train_bytes_per_token = 3_000_000  # measured 2.2 MB (B=1), 2.8 MB (B=8, T=512: 13.9 GB peak)
    prefill_bytes_per_token = 90_000  # measured 78 kB: sdpa's CPU flash kernel keeps no T x T scores
    kv_bytes_per_token = 2 * 12 * 768 * 4

    @property
    def notes(self):
        extended = (f"n_positions extended from GPT-2's 1024 to {self.n_positions} (extra learned position rows) "
                    if self.n_positions > 1024 else "")
        return [f"transformers GPT2LMHeadModel(GPT2Config(n_positions={self.n_positions})), random weights, tied head; "
                + extended + "attention implementation sdpa (the default); decode with the default DynamicCache"]

    @property
    def n_positions(self):  # the same in every worker of a run (training too), so one model is measured
        return max(1024, 1024 * math.ceil(self.run_max_len / 1024))

    def build(self, dtype, train=False):
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_positions=self.n_positions))
        assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
        return model.to(dtype)

    def input_embeddings(self, model):
        return [model.transformer.wte.weight, model.transformer.wpe.weight]

    def mixing_flops(self, model, T):
        """Causal attention: q k^T and p v over the keys up to each position, 4 d t per layer at position t."""
        c = model.config
        return c.n_layer * 2 * c.n_embd * T * (T + 1)

    def prefill(self, model, ids):
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    def new_state(self, model):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def state_bytes(self, state):
        return sum(t.nbytes for layer in state.layers for t in (layer.keys, layer.values) if t is not None)


# --------------------------------------------------------------------------------------------------
# transformers' own xLSTM (the 7B design)
# --------------------------------------------------------------------------------------------------


class HfXlstmPeer(Peer):
    name = "hf_xlstm"
    title = "transformers xLSTM (7B design)"
    train_bytes_per_token = 1_800_000  # measured 1.5 MB
    prefill_bytes_per_token = 90_000  # measured 75 kB

    @property
    def notes(self):
        c = HF_XLSTM_CONFIG
        return [f"transformers.xLSTMForCausalLM (model_type 'xlstm', mLSTM + gated-FFN blocks), hidden "
                f"{c['hidden_size']}, {c['num_hidden_layers']} blocks, {c['num_heads']} heads, untied head; runs "
                "xlstm.xlstm_large inside (the xlstm package is installed) with torch-native kernels "
                "(chunkwise--native_autograd, native_sequence__native, native step)",
                "hf_xlstm: mode='inference' for prefill/decode, mode='train' for training; autocast_kernel_dtype "
                "and inference_state_dtype = the run's dtype (its native kernels fail on fp32 states with bf16 "
                "inputs, so bf16 runs keep bf16 states); prefill = backbone + head on the last position "
                "(its forward has no logits_to_keep)"]

    def build(self, dtype, train=False):
        from transformers import xLSTMConfig, xLSTMForCausalLM

        name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
        # the native kernels need the state in the input dtype (fp32 states with bf16 inputs fail)
        config = xLSTMConfig(**HF_XLSTM_CONFIG, mode="train" if train else "inference", autocast_kernel_dtype=name,
                             inference_state_dtype=name, max_inference_chunksize=max(16384, self.max_len))
        torch.manual_seed(0)  # the weights xlstm_hf_large converts (same seed, same init)
        return xLSTMForCausalLM(config).to(dtype)

    def mixing_flops(self, model, T):
        """Chunkwise mLSTM (chunk 64), as for xlstm_hf: per head and token 2 L (DK + DV) + 4 DK DV."""
        c = model.config
        L = min(c.chunk_size, T)
        DK, DV = c.qk_head_dim, c.v_head_dim
        return c.num_hidden_layers * c.num_heads * T * (2 * L * (DK + DV) + 4 * DK * DV)

    def _last_logits(self, model, hidden):
        from transformers.models.xlstm.modeling_xlstm import soft_cap

        logits = model.lm_head(hidden[:, -1:].to(model.lm_head.weight.dtype)).float()
        return soft_cap(logits, model.config.output_logit_soft_cap)

    def prefill(self, model, ids):
        return self._last_logits(model, model.backbone(ids, use_cache=False).last_hidden_state)

    def new_state(self, model):
        from transformers.models.xlstm.modeling_xlstm import xLSTMCache

        return xLSTMCache(model.config, max_batch_size=1, dtype=getattr(torch, model.config.inference_state_dtype))

    def extend(self, model, state, ids):
        for chunk in ids.split(self.extend_chunk, dim=1):
            model.backbone(chunk, cache_params=state, use_cache=True)
        return state

    def replicate(self, state, batch):
        from transformers.models.xlstm.modeling_xlstm import xLSTMCache

        new = xLSTMCache(state.config, max_batch_size=batch, dtype=state.dtype)
        for layer, tensors in state.rnn_state.items():
            for dst, src in zip(new.rnn_state[layer], tensors):
                dst.copy_(src.expand_as(dst))
        new.seqlen_offset = state.seqlen_offset.clone()
        return new

    def step(self, model, token, state):
        model(input_ids=token, cache_params=state, use_cache=True)
        return state

    def state_bytes(self, state):
        return sum(t.nbytes for tensors in state.rnn_state.values() for t in tensors)


# --------------------------------------------------------------------------------------------------
# xlstm_hf's large (xLSTM-7B) design with transformers' xLSTM weights, converted
# --------------------------------------------------------------------------------------------------


class XlstmHfLargePeer(XlstmHfPeer):
    name = "xlstm_hf_large"
    title = "xlstm_hf large design = hf_xlstm's weights"
    notes = ["xlstm_hf_large: hf_xlstm's model (same config, same seed, so the same weights) saved and converted "
             "with xlstm_hf.conversion.large.convert_checkpoint: the same function and FLOPs as hf_xlstm"]
    train_bytes_per_token = 2_000_000
    prefill_bytes_per_token = 90_000

    def build(self, dtype, train=False):
        import tempfile

        import xlstm_hf
        from xlstm_hf.conversion.large import convert_checkpoint

        theirs = HfXlstmPeer(self.max_len, self.run_max_len).build(torch.float32, train=False)
        with tempfile.TemporaryDirectory() as tmp:
            theirs.save_pretrained(f"{tmp}/theirs")
            del theirs
            convert_checkpoint(f"{tmp}/theirs", f"{tmp}/ours", progress_bar=False)
            model = xlstm_hf.xLSTMForCausalLM.from_pretrained(f"{tmp}/ours")
        return model.to(dtype)

    def mixing_flops(self, model, T):
        """Chunkwise mLSTM per head and token: 2 L (DK + DV) + 4 DK DV (as hf_xlstm's)."""
        c = model.config
        NH, L = c.mlstm_num_heads, min(c.chunk_size, T)
        DK, DV = c.mlstm_qk_dim // NH, c.mlstm_v_dim // NH
        return c.num_blocks * NH * T * (2 * L * (DK + DV) + 4 * DK * DV)


PEERS: dict[str, type[Peer]] = {cls.name: cls for cls in (XlstmHfPeer, OfficialPeer, Gpt2Peer, HfXlstmPeer,
                                                          XlstmHfLargePeer)}
