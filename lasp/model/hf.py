"""Import a Hugging Face Llama-family model directory into a LinearLlama, exactly.

    model = from_hf("path/to/dir", dtype=torch.float64, layer_pattern="LLLS")

Reads config.json and the weights (model.safetensors, or shards listed in model.safetensors.index.json)
of Llama 2/3/3.1/3.2 (`llama3` RoPE scaling included), Mistral, Qwen2/2.5 (q/k/v biases) and Qwen3
(per-head q/k RMSNorm). With every layer softmax (the default pattern here, "S") the logits equal
transformers' own forward. A config field it cannot honour (another activation, MLP or output biases,
sliding windows, another RoPE scaling, ...) is an error naming it and its value, with every such
problem at once; nothing is silently dropped. `overrides` are ModelConfig fields, e.g. layer_pattern
and linear_variant to linearise layers: the linear layers then reuse the imported q, k, v and o. With a
window, output_norm defaults to false here, and true is refused (`fresh_norm_problems`).
A directory that cannot be read (config.json or the index not JSON, a shard the index names absent, a
truncated safetensors file, a tensor missing) is an HFImportError naming the file and what is wrong.
"""

import json
import os

import torch
from torch import nn

from lasp.model.config import ModelConfig
from lasp.model.llama import LinearLlama
from lasp.model.pretrained import FORMAT, TOKENIZER
from lasp.model.variants import VARIANTS

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# fields that change nothing in a forward pass (ids, bookkeeping, generation and output options)
HARMLESS = {
    "_name_or_path",
    "_model_name_or_path",
    "architectures",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "max_position_embeddings",
    "model_type",
    "chunk_size_feed_forward",
    "id2label",
    "label2id",
    "is_encoder_decoder",
    "output_attentions",
    "output_hidden_states",
    "problem_type",
    "return_dict",
    "max_window_layers",
    "tokenizer_class",
    "attention_dropout",  # dropout is off in evaluation; LASP trains without it (checked below to be 0)
}


class HFImportError(ValueError):
    """Everything in a Hugging Face directory that LASP cannot import exactly, one problem per line."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"cannot import {path}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))


def _rope(c: dict, problems: list[str]) -> dict:
    """ModelConfig's RoPE fields from transformers 5's rope_parameters (or 4's rope_theta + rope_scaling)."""
    params = dict(c.get("rope_parameters") or {})
    if not params:
        params = dict(c.get("rope_scaling") or {})
        params.setdefault("rope_theta", c.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(params.get("rope_theta", c.get("rope_theta", 10000.0)))}
    if kind == "llama3":
        out.update(
            rope_scaling="llama3",
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_positions=int(params["original_max_position_embeddings"]),
        )
    elif kind != "default":
        problems.append(f"rope_parameters.rope_type = {kind!r}: only default and llama3 RoPE are supported")
    return out


def model_config(c: dict, path: str = "config.json", **overrides) -> ModelConfig:
    """A ModelConfig from a transformers config dict, or HFImportError naming every field it cannot honour."""
    problems = []
    archs = c.get("architectures") or []
    family = {ARCHITECTURES.get(a) for a in archs} - {None}
    if len(family) != 1:
        raise HFImportError(path, [f"architectures = {archs}: supported are {', '.join(ARCHITECTURES)}"])
    family = family.pop()
    known = HARMLESS | {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "rms_norm_eps",
        "tie_word_embeddings",
        "hidden_act",
        "rope_parameters",
        "rope_theta",
        "rope_scaling",
        "attention_bias",
        "mlp_bias",
        "pretraining_tp",
        "sliding_window",
        "use_sliding_window",
        "layer_types",
    }
    for key in sorted(set(c) - known):
        problems.append(f"{key} = {c[key]!r}: a config field LASP does not know, so it cannot honour it")
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act = {c['hidden_act']!r}: LASP's MLP is SwiGLU (silu)")
    if c.get("mlp_bias"):
        problems.append("mlp_bias = True: LASP's MLP has no biases")
    if c.get("attention_bias"):
        problems.append(f"attention_bias = True: {family}'s attention biases include o_proj's, which LASP lacks")
    if c.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp = {c['pretraining_tp']}: only 1 (exact matmuls) is supported")
    if float(c.get("attention_dropout") or 0.0) != 0.0:
        problems.append(f"attention_dropout = {c['attention_dropout']}: LASP has no attention dropout")
    window = c.get("sliding_window")
    if window is not None and (family == "mistral" or c.get("use_sliding_window")):
        problems.append(
            f"sliding_window = {window}: LASP's softmax layers attend over the whole sequence; a "
            "model trained with a window is not imported (set it to null only if it never mattered)"
        )
    kinds = set(c.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        problems.append(f"layer_types = {sorted(kinds)}: only full_attention layers are supported")
    rope = _rope(c, problems)
    H = c.get("num_attention_heads")
    head_dim = c.get("head_dim") or (c["hidden_size"] // H if H else 0)
    fields = dict(
        vocab_size=c.get("vocab_size"),
        hidden_size=c.get("hidden_size"),
        num_layers=c.get("num_hidden_layers"),
        num_heads=H,
        num_kv_heads=c.get("num_key_value_heads") or H,
        ffn_hidden_size=c.get("intermediate_size"),
        layer_pattern="S",
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        attention_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        float32_norm_rope=True,
        output_norm=not overrides.get("window"),  # see fresh_norm_problems
        attention_head_dim=head_dim if H and head_dim != c["hidden_size"] // H else 0,
        **rope,
    )
    missing = [k for k, v in fields.items() if v is None]
    problems += [f"config.json has no value for {k}" for k in missing]
    if problems:
        raise HFImportError(path, problems)
    try:
        cfg = ModelConfig(**{**fields, **overrides})
    except (TypeError, ValueError) as e:
        raise HFImportError(path, [str(e)]) from None
    problems = fresh_norm_problems(cfg, ModelConfig(**fields))
    if problems:
        raise HFImportError(path, problems)
    return cfg


def fresh_norm_problems(cfg: ModelConfig, source: ModelConfig) -> list[str]:
    """model.output_norm with model.window on layers that are softmax in the weights and linear in `cfg`
    (linearised), refused. The window's normaliser, shared with the linear branch, already gives a
    weighted mean of v, on the scale of the softmax output it stands in for; a fresh per-head RMSNorm
    (weight 1) on top puts every head's output at RMS 1 instead, and the imported o_proj starts far from the
    original model. Without a window the linear branch has no normaliser and the norm is what bounds its
    output (either way such a layer starts far off). The delta rule's layers have their gated norm
    whatever output_norm says."""
    if not (cfg.output_norm and cfg.window) or VARIANTS[cfg.linear_variant].delta:
        return []
    layers = [i for i in range(cfg.num_layers) if cfg.mixer(i) == "L" and source.mixer(i) == "S"]
    if not layers:
        return []
    shown = ", ".join(map(str, layers[:8])) + (", ..." if len(layers) > 8 else "")
    return [
        f"model.output_norm = True with model.window = {cfg.window} on {len(layers)} layer(s) linearised "
        f"from the weights' softmax layers ({shown}): the window's normaliser already puts each head's "
        "output on the softmax output's scale, and a fresh RMSNorm would rescale it to RMS 1, so the "
        "imported o_proj would start far from the original model; set output_norm to false (from_hf's "
        "default with a window)"
    ]


def _names(cfg: ModelConfig) -> dict[str, str]:
    """LASP parameter name -> transformers' name, for every imported parameter."""
    out = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        out[ours + "attn_norm.weight"] = hf + "input_layernorm.weight"
        out[ours + "mlp_norm.weight"] = hf + "post_attention_layernorm.weight"
        if cfg.moe is not None and cfg.moe.is_moe(i):
            out.update(_expert_names(cfg, ours, hf))
        else:
            for p in ("gate_proj", "up_proj", "down_proj"):
                out[f"{ours}mlp.{p}.weight"] = f"{hf}mlp.{p}.weight"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{ours}mixer.{p}.weight"] = f"{hf}self_attn.{p}.weight"
            if cfg.attention_bias and p != "o_proj":
                out[f"{ours}mixer.{p}.bias"] = f"{hf}self_attn.{p}.bias"
        if cfg.qk_norm:  # linear layers normalise their q and k too (the delta rule's refuse qk_norm)
            out[ours + "mixer.q_norm.weight"] = hf + "self_attn.q_norm.weight"
            out[ours + "mixer.k_norm.weight"] = hf + "self_attn.k_norm.weight"
    return out


def _expert_names(cfg: ModelConfig, ours: str, hf: str) -> dict[str, str]:
    """A MoE layer's names: Mixtral's (block_sparse_moe.gate, experts.{e}.w1 / w3 / w2 for gate / up / down)
    or, for a model with q/k norms, Qwen3-MoE's (mlp.gate, mlp.experts.{e}.gate_proj / up_proj / down_proj):
    one tensor per expert, as both families store them."""
    out = {}
    if cfg.qk_norm:
        out[f"{ours}mlp.router.weight"] = f"{hf}mlp.gate.weight"
        for e in range(cfg.moe.num_experts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                out[f"{ours}mlp.experts.{e}.{p}.weight"] = f"{hf}mlp.experts.{e}.{p}.weight"
        return out
    out[f"{ours}mlp.router.weight"] = f"{hf}block_sparse_moe.gate.weight"
    for e in range(cfg.moe.num_experts):
        for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            out[f"{ours}mlp.experts.{e}.{p}.weight"] = f"{hf}block_sparse_moe.experts.{e}.{w}.weight"
    return out


def _config_json(path: str, what: str = "no config.json") -> dict:
    """The parsed config.json of a model directory, or HFImportError saying what the path is instead."""
    if not os.path.isdir(path):
        raise HFImportError(path, ["it is not a directory" if os.path.exists(path) else "it does not exist"])
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise HFImportError(path, [what])
    return _json(path, "config.json")


def _json(path: str, name: str) -> dict:
    """The JSON object in the file `name` of directory `path`, or HFImportError naming the file."""
    try:
        with open(os.path.join(path, name), encoding="utf-8") as f:
            out = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HFImportError(path, [f"{name} is not readable JSON: {e}"]) from None
    if not isinstance(out, dict):
        raise HFImportError(path, [f"{name} holds a JSON {type(out).__name__}, not an object"])
    return out


INDEX = "model.safetensors.index.json"


def _weight_map(path: str) -> dict[str, str] | None:
    """The index's tensor name -> file name, or None without an index."""
    if not os.path.isfile(os.path.join(path, INDEX)):
        return None
    mapping = _json(path, INDEX).get("weight_map")
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise HFImportError(path, [f"{INDEX} has no weight_map of tensor names to file names"])
    return mapping


def _weight_files(path: str) -> list[str]:
    """The safetensors files of a directory: model.safetensors, or the shards its index lists (each present)."""
    mapping = _weight_map(path)
    if mapping is not None:
        names = sorted(set(mapping.values()))
        absent = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if absent:
            raise HFImportError(
                path,
                [
                    f"{n}: named in {INDEX} for {sum(v == n for v in mapping.values())} tensor(s), but absent"
                    for n in absent
                ],
            )
        return [os.path.join(path, n) for n in names]
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return [os.path.join(path, "model.safetensors")]
    raise HFImportError(
        path,
        [
            "no model.safetensors or model.safetensors.index.json (pytorch_model.bin is "
            "not read: convert it with transformers' save_pretrained)"
        ],
    )


def _unreadable(path: str, file: str, e: Exception) -> HFImportError:
    return HFImportError(
        path, [f"{os.path.basename(file)}: not a readable safetensors file (truncated or damaged?): {e}"]
    )


def weight_keys(path: str) -> dict[str, set[str]]:
    """The tensor names of each safetensors file of the directory, from the file headers only (no tensor is
    loaded); HFImportError naming a file that cannot be read (truncated, damaged: its header must describe
    exactly its bytes) or that lacks a tensor the index maps to it."""
    from safetensors import SafetensorError, safe_open

    out = {}
    for name in _weight_files(path):
        try:
            with safe_open(name, "pt") as f:
                out[name] = set(f.keys())
        except (SafetensorError, OSError) as e:
            raise _unreadable(path, name, e) from None
    lacking = sorted(
        (n, file) for n, file in (_weight_map(path) or {}).items() if n not in out[os.path.join(path, file)]
    )
    if lacking:
        raise HFImportError(
            path, [f"{file}: {INDEX} maps {n} to it, but it holds no such tensor" for n, file in lacking]
        )
    return out


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's model.safetensors, or of the shards its index lists (`weight_keys`
    checks the files first)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out = {}
    for name in weight_keys(path):
        try:
            out.update(load_file(name))
        except (SafetensorError, OSError) as e:
            raise _unreadable(path, name, e) from None
    return out


def from_hf(path: str, *, dtype: torch.dtype | None = None, device="cpu", **overrides) -> LinearLlama:
    """The LinearLlama of a Hugging Face directory (see the module doc); `dtype` defaults to the weights'."""
    cfg = model_config(_config_json(path), os.path.join(path, "config.json"), **overrides)
    weights = read_weights(path)
    names = _names(cfg)
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)  # some exports write the tied copy too
    problems = _tensor_problems(path, names, set(weights), cfg.tie_embeddings)
    if problems:
        raise HFImportError(path, problems)
    dtype = dtype or weights[names["embed.weight"]].dtype
    model = LinearLlama(cfg).to(dtype=dtype, device=device)
    own = model.state_dict()
    for ours, hf in names.items():
        if tuple(weights[hf].shape) != tuple(own[ours].shape):
            problems.append(f"{hf} has shape {list(weights[hf].shape)}, LASP's {ours} {list(own[ours].shape)}")
    if problems:
        raise HFImportError(path, problems)
    # the parameters the import does not provide (a linearised layer's gates, ...) keep their initialisation
    model.load_state_dict({ours: weights[hf].to(dtype) for ours, hf in names.items()}, strict=False)
    return model.eval()


def _tensor_problems(path: str, names: dict[str, str], keys: set[str], tied: bool) -> list[str]:
    """Each tensor of `names` (LASP name -> the source's) that the files lack, and each tensor of the files
    that has no place (a tied model's lm_head copy and RoPE buffers aside)."""
    where = f"the files {INDEX} lists" if _weight_map(path) is not None else "model.safetensors"
    problems = [f"{src} is missing from {where} (for {ours})" for ours, src in names.items() if src not in keys]
    spare = {k for k in keys if k.endswith("rotary_emb.inv_freq")} | ({"lm_head.weight"} if tied else set())
    problems += [f"{k}: a tensor LASP has no place for" for k in sorted(keys - set(names.values()) - spare)]
    return problems


SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "ffn_hidden_size",
    "head_dim",
    "tie_embeddings",
    "attention_bias",
    "qk_norm",
    "rope_theta",
    "rope_scaling",
    "norm_eps",
)


def _model_names(cfg: ModelConfig) -> list[str]:
    """The state-dict names of a LinearLlama of `cfg` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return list(LinearLlama(cfg).state_dict())


def _is_lasp_export(c: dict) -> bool:
    return c.get("format") == FORMAT


def is_hf_directory(path: str) -> bool:
    """A directory whose config.json is a Hugging Face model's (not a LASP export's)."""
    try:
        return not _is_lasp_export(_config_json(path))
    except (HFImportError, OSError, ValueError):
        return False


def source_config(path: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory or a LASP export (lasp.export), once its weight files'
    headers show every tensor of that config and nothing else; HFImportError naming what is wrong."""
    c = _config_json(path, "no config.json: neither a Hugging Face model directory nor a LASP export")
    if _is_lasp_export(c):
        cfg = ModelConfig(**c["model"])
        names = {k: k for k in _model_names(cfg) if not (cfg.tie_embeddings and k == "lm_head.weight")}
    else:
        cfg = model_config(c, os.path.join(path, "config.json"))
        names = _names(cfg)
    keys = set().union(*weight_keys(path).values())
    problems = _tensor_problems(path, names, keys, cfg.tie_embeddings)
    if problems:
        raise HFImportError(path, problems)
    return cfg


def mismatches(ours: ModelConfig, source: ModelConfig) -> list[str]:
    """The shape fields in which a run's model differs from the weights it starts from (the mixers'
    pattern and variant may differ: that is linearisation), and a fresh output norm on a linearised layer
    (`fresh_norm_problems`)."""
    return [
        f"model.{k} = {getattr(ours, k)!r}, but the weights have {getattr(source, k)!r}"
        for k in SHAPE_FIELDS
        if getattr(ours, k) != getattr(source, k)
    ] + fresh_norm_problems(ours, source)


def _source_names(path: str, cfg: ModelConfig) -> dict[str, str]:
    """LASP name -> the source's name, for a model of `cfg` (a LASP export uses LASP's names; its linear and
    softmax layers share the q, k, v, o names, so a changed pattern still finds them)."""
    return _names(cfg) if not _is_lasp_export(_config_json(path)) else {k: k for k in _model_names(cfg)}


def initial_state(path: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face directory or a LASP export under the LASP names of a model of `cfg`
    (whose layer_pattern and linear_variant may differ from the source's: a linear layer takes the
    softmax layer's q, k, v, o). Parameters the source lacks (a new layer's gates) are left out."""
    weights = read_weights(path)
    return {ours: weights[src] for ours, src in _source_names(path, cfg).items() if src in weights}


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """transformers' config.json for a LinearLlama whose every layer is softmax: LlamaForCausalLM, or
    Qwen2ForCausalLM with q/k/v biases, or Qwen3ForCausalLM with q/k norms; with MoE layers
    MixtralForCausalLM, or Qwen3MoeForCausalLM with q/k norms; HFImportError otherwise."""
    problems = [
        f"layer {i} is linear (model.layer_pattern {cfg.layer_pattern!r}): transformers has no such layer"
        for i in range(cfg.num_layers)
        if cfg.mixer(i) != "S"
    ]
    if cfg.attention_bias and cfg.qk_norm:
        problems.append("q/k/v biases with q/k norms: neither Qwen2 nor Qwen3")
    if cfg.lora_rank:
        problems.append(
            f"LoRA adapters (model.lora_rank {cfg.lora_rank}): merge them into the weights first "
            "(lasp.model.lora.merge_lora; python -m lasp.export does)"
        )
    moe = cfg.moe
    if moe is not None:  # Mixtral, or Qwen3-MoE with q/k norms: softmax top-k renormalised, no shared expert
        bad = [
            f"model.moe.{k} = {getattr(moe, k)!r} (transformers' Mixtral / Qwen3-MoE take {v!r})"
            for k, v in (("router", "softmax"), ("shared_ffn_hidden_size", 0), ("expert_bias", False))
            if getattr(moe, k) != v
        ]
        if moe.top_k < 2:
            bad.append(f"model.moe.top_k = {moe.top_k} (their top-1 weight is 1, LASP's the softmax probability)")
        if not cfg.qk_norm and "D" in moe.pattern:
            bad.append(f"model.moe.pattern {moe.pattern!r}: Mixtral has experts in every layer")
        if cfg.attention_bias:
            bad.append("q/k/v biases: neither Mixtral nor Qwen3-MoE has them")
        problems += bad
    if problems:
        raise HFImportError("the model", problems)
    if moe is not None:
        return _moe_config(cfg, dtype)
    family = "qwen3" if cfg.qk_norm else "qwen2" if cfg.attention_bias else "llama"
    arch = {v: k for k, v in ARCHITECTURES.items()}[family]
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_positions,
        )
    out = {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "max_position_embeddings": int(
            cfg.rope_original_max_positions * (cfg.rope_factor if cfg.rope_scaling == "llama3" else 1)
        ),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if family != "qwen2":
        out["attention_bias"] = False
    if family != "llama":
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def _moe_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    moe, qwen = cfg.moe, cfg.qk_norm
    out = {
        "architectures": ["Qwen3MoeForCausalLM" if qwen else "MixtralForCausalLM"],
        "model_type": "qwen3_moe" if qwen else "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.rope_original_max_positions,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "output_router_logits": False,
        "attention_bias": False,
        "sliding_window": None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if qwen:
        out.update(
            num_experts=moe.num_experts,
            moe_intermediate_size=moe.ffn_hidden_size,
            intermediate_size=cfg.ffn_hidden_size,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(cfg.num_layers) if not moe.is_moe(i)],
            use_sliding_window=False,
        )
    else:
        out.update(num_local_experts=moe.num_experts, intermediate_size=moe.ffn_hidden_size)
    return out


def to_hf(model: nn.Module, directory: str, tokenizer: dict | None = None) -> None:
    """Write `model` (every layer softmax) as a transformers model directory: config.json, model.safetensors
    with transformers' names (and tokenizer.json when the tokenizer description names one). transformers loads it and
    gives the same logits (exactly, with model.float32_norm_rope)."""
    from safetensors.torch import save_file

    cfg = model.cfg
    state = model.state_dict()
    dtype = state["embed.weight"].dtype
    config = hf_config(cfg, dtype)
    os.makedirs(directory, exist_ok=True)
    weights = {hf: state[ours].contiguous() for ours, hf in _names(cfg).items()}
    save_file(weights, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer and tokenizer.get("path") and os.path.isfile(tokenizer["path"]):
        import shutil

        shutil.copyfile(tokenizer["path"], os.path.join(directory, TOKENIZER))


def provided(path: str, cfg: ModelConfig) -> set[str]:
    """The LASP names of the parameters a source (a Hugging Face directory or a LASP export) provides for a
    model of `cfg`, read from the file headers only (no tensor is loaded)."""
    keys = set().union(*weight_keys(path).values())
    out = {ours for ours, src in _source_names(path, cfg).items() if src in keys}
    if cfg.tie_embeddings and "embed.weight" in out:
        out.add("lm_head.weight")
    return out
