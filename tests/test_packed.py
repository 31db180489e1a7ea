"""Linear layers packed for oneDNN (`stillhouse.models.packed`): the same function as the layer they replace, only
where they help, and a tied embedding left alone."""

from __future__ import annotations

import pytest
import torch

from stillhouse.models import packed as packing
from stillhouse.models.packed import PackedLinear, pack_linears

pytestmark = pytest.mark.skipif(not packing._ops_available(torch.float32),
                                reason="this PyTorch build has no oneDNN linear operators")


class Net(torch.nn.Module):
    """An embedding, two linear layers and an output layer tied to the embedding."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(300, 48)
        self.up = torch.nn.Linear(48, 96, bias=True)
        self.down = torch.nn.Linear(96, 48, bias=False)
        self.out = torch.nn.Linear(48, 300, bias=False)
        self.out.weight = self.emb.weight
        self.to(dtype)

    def forward(self, ids):
        h = self.emb(ids)
        return self.out(h + self.down(torch.relu(self.up(h))))


def test_a_packed_layer_computes_the_layer_it_replaces():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 200, bias=True)
    p = PackedLinear(lin)
    assert p.packed.is_mkldnn and (p.in_features, p.out_features) == (64, 200)
    assert torch.equal(p.weight, lin.weight.detach())  # the dense weight, rebuilt exactly
    with torch.inference_mode():
        for shape in [(1, 64), (2, 64), (7, 1, 64), (3, 33, 64), (130, 64), (0, 64)]:
            x = torch.randn(*shape)
            got, want = p(x), torch.nn.functional.linear(x, lin.weight, lin.bias)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        x = torch.randn(5, 3, 64).transpose(0, 1)  # not contiguous
        torch.testing.assert_close(p(x), torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    # with gradients wanted it still computes the layer (through F.linear), gradients included
    x = torch.randn(4, 64, requires_grad=True)
    p(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(4, 64), rtol=1e-5, atol=1e-5)


def test_pack_linears_swaps_every_linear_layer_of_a_large_enough_model_and_leaves_the_embedding():
    net, ref = Net(), Net()
    ids = torch.randint(0, 300, (3, 9))
    assert pack_linears(net) == 0  # 24K linear parameters: below MIN_PARAMS, left as they are
    assert pack_linears(net, min_params=10_000) == 3
    assert all(isinstance(m, PackedLinear) for m in (net.up, net.down, net.out))
    assert not any(type(m) is torch.nn.Linear for m in net.modules())
    assert torch.equal(net.emb.weight, ref.emb.weight)  # the tied embedding keeps its dense weight
    with torch.inference_mode():
        torch.testing.assert_close(net(ids), ref(ids), rtol=1e-5, atol=1e-5)
    assert pack_linears(net, min_params=0) == 0  # nothing left to pack


def test_pack_linears_leaves_what_it_cannot_pack(monkeypatch):
    assert pack_linears(Net(torch.float16), min_params=0) == 0  # a dtype it does not pack
    monkeypatch.setattr(packing, "_ops_available", lambda dtype: False)
    assert pack_linears(Net(), min_params=0) == 0  # no oneDNN

    def refuse(*a, **k):
        raise RuntimeError("no such layout")

    monkeypatch.setattr(packing, "_ops_available", lambda dtype: True)
    monkeypatch.setattr(packing.PackedLinear, "__init__", refuse)
    net = Net()
    assert pack_linears(net, min_params=0) == 0 and type(net.up) is torch.nn.Linear


def test_a_packed_layer_that_disagrees_with_f_linear_is_not_used(monkeypatch):
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: torch.zeros(*x.shape[:-1], self.out_features))
    net = Net()
    assert pack_linears(net, min_params=0) == 0 and type(net.up) is torch.nn.Linear


@pytest.mark.skipif(not packing._ops_available(torch.bfloat16), reason="no bfloat16 in this CPU's oneDNN")
def test_bfloat16_layers_are_packed_where_onednn_has_bfloat16():
    net, ref = Net(torch.bfloat16), Net(torch.bfloat16)
    assert pack_linears(net, min_params=0) == 3
    ids = torch.randint(0, 300, (2, 5))
    with torch.inference_mode():
        got, want = net(ids).float(), ref(ids).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()

