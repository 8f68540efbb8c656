"""Activation checkpointing per layer: the same loss and gradients as without it, and less kept memory."""

import pytest
import torch

from lasp.model import LinearLlama, ModelConfig, lm_loss_sum
from lasp.parallel.ac import apply_ac

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1, ffn_hidden_size=64, layer_pattern="LLLS"
)


def _loss_and_grads(every: int):
    torch.manual_seed(0)
    model = LinearLlama(CFG).double()
    assert apply_ac(model, every) == (0 if every == 0 else len(range(0, CFG.num_layers, every)))
    tokens = torch.randint(0, CFG.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    loss = lm_loss_sum(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2, 3])
def test_checkpointed_layers_give_the_same_loss_and_gradients(every):
    loss, grads = _loss_and_grads(0)
    loss_ac, grads_ac = _loss_and_grads(every)
    assert grads.keys() == grads_ac.keys()  # no renamed parameters: checkpoints and configs stay compatible
    torch.testing.assert_close(loss_ac, loss, rtol=1e-12, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_checkpointing_keeps_fewer_activations():
    def saved(every):
        torch.manual_seed(0)
        model = LinearLlama(CFG)
        apply_ac(model, every)
        tokens = torch.randint(0, CFG.vocab_size, (2, 256))
        count = []

        def pack(t):
            count.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens).sum()
        return sum(count)

    assert saved(1) < 0.5 * saved(0)


def test_bad_interval_is_an_error():
    with pytest.raises(ValueError, match="interval must be >= 0, got -1"):
        apply_ac(LinearLlama(CFG), -1)
