"""LASP models in EleutherAI's lm-evaluation-harness (`lm-eval` on PyPI): the model name `lasp`.

    python -m lasp.eval.harness run --model lasp --model_args path=CHECKPOINT --tasks hellaswag --device cpu

is lm-eval's own command line with the `lasp` model registered (the `lm_eval` console script cannot see a
model that no module it imports registers). In Python, importing this module registers it (so does
`import lasp` once lm_eval is imported):

    import lasp.eval.harness, lm_eval
    lm_eval.simple_evaluate(model="lasp", model_args="path=runs/x/checkpoints/step-00000400", tasks=[...])

`path` is a trainer checkpoint, a LASP export or a Hugging Face directory, with its tokenizer. Every
request runs on one device:
- loglikelihood: one forward of context + continuation (an empty context starts from the EOS token); the
  continuation's summed log-probability, and whether greedy decoding would write it;
- loglikelihood_rolling: the whole text after an EOS in one forward (no context limit: linear layers have
  none), or lm-eval's rolling windows of `max_length` tokens when given;
- generate_until: greedy decoding with the constant-size linear states and the softmax KV caches
  (lasp.model.decode), stopping at any of `until` or after `max_gen_toks` tokens.
"""

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry


class LaspLM(LM):
    def __init__(
        self,
        path: str,
        device: str = "cpu",
        dtype: str = "float32",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **_ignored,
    ):
        super().__init__()
        from lasp.eval.__main__ import fits, load
        from lasp.train.artifacts import tokenizer_of

        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"the lasp model was asked for device {device!r} (lm-eval's command line defaults to "
                "cuda), but no CUDA GPU is visible: pass --device cpu"
            )

        self.tok = tokenizer_of(path)
        wrong = fits(path, self.tok)
        if wrong:
            raise ValueError(wrong[0])
        self.model = load(path, device).to(getattr(torch, dtype)).eval()
        self.device_ = torch.device(device)
        self.max_length = None if max_length in (None, "", "None") else int(max_length)
        self.max_gen_toks = int(max_gen_toks)

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """Log-probabilities [len(ids) - 1, vocab] of each next token of `ids`, in float64."""
        tokens = torch.tensor(ids[:-1], device=self.device_)[None]
        return F.log_softmax(self.model(tokens)[0].double(), -1).cpu()

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        logp = self._logprobs(context + continuation)[len(context) - 1 :]
        target = torch.tensor(continuation)
        return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = self.tok.encode(context) if context else [self.tok.eos_id]
            out.append(self._score(ctx, self.tok.encode(continuation)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            ids = self.tok.encode(req.args[0])
            if self.max_length is None:
                out.append(self._score([self.tok.eos_id], ids)[0])
                continue
            windows = get_rolling_token_windows(
                ids, prefix_token=self.tok.eos_id, max_seq_len=self.max_length, context_len=1
            )
            out.append(sum(self._score(*make_disjoint_window(w))[0] for w in map(list, windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lasp.model.decode import DecodeState, decode_step

        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            state = DecodeState.empty(self.model, 1)
            ids = self.tok.encode(context) or [self.tok.eos_id]
            logits = decode_step(self.model, torch.tensor([ids], device=self.device_), state, last_only=True)
            new: list[int] = []
            text = ""
            for _ in range(limit):
                nxt = int(logits[0, -1].argmax())
                if nxt == self.tok.eos_id:
                    break
                new.append(nxt)
                text = self.tok.decode(new)
                if any(u in text for u in until):
                    break
                logits = decode_step(self.model, torch.tensor([[nxt]], device=self.device_), state)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


def register() -> None:
    """Register `LaspLM` as lm-eval's `lasp` model (the built-in models first: lm-eval loads them only
    into an empty registry)."""
    import lm_eval.models  # noqa: F401

    if "lasp" not in model_registry.keys():
        model_registry.register("lasp", target=LaspLM)


register()


def main(argv=None) -> None:
    """lm-eval's command line, with the `lasp` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
