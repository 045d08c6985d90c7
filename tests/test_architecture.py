"""The shape of the code: no import cycles, a transform that leaves nothing behind, decode-step families that
implement the protocol, and the switchboard."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from decoder_zoo import ALL, PAD, left_padded_batch, make_decoder, supported
from zoo import CONFIGS, LAYOUTS, make_batch, make_model

import bettertransformer
from bettertransformer import BetterTransformer
from bettertransformer.adapters.decode_steps import DecodeStep
from bettertransformer.registry import REGISTRY
from bettertransformer.switches import SWITCHES, switched

PACKAGE = Path(bettertransformer.__file__).parent


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, anywhere in the file (function-level imports count too)."""
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bettertransformer"):
            found.add(node.module)
    return found


def test_package_modules_import_no_cycle():
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in modules.items()}
    graph = {name: sorted(t for t in _imports(path) if t in modules and t != name) for name, path in modules.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of the code's layering.
    graph = {n: [t for t in ts if not t.startswith(n + ".")] for n, ts in graph.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(name) :] + [name]))
        if name in done:
            return
        for target in graph[name]:
            visit(target, trail + [name])
        done.add(name)

    for name in graph:
        visit(name, [])


def _attributes(model: torch.nn.Module) -> dict[str, set[str]]:
    return {name: set(vars(m)) for name, m in model.named_modules()}


def _leftovers(reversed_model: torch.nn.Module, stock_model: torch.nn.Module) -> dict[str, set[str]]:
    stock = _attributes(stock_model)
    return {n: extra for n, attrs in _attributes(reversed_model).items() if (extra := attrs - stock.get(n, set()))}


@pytest.mark.parametrize("name", ALL)
def test_reverse_leaves_no_attribute_on_a_decoder(name, monkeypatch):
    """After transform, a forward, generate and reverse, no module carries an attribute that the same model run
    stock lacks."""
    if not supported(name):
        pytest.skip("transform refuses this configuration")
    monkeypatch.setattr(SWITCHES, "generate_devices", frozenset({"cpu", "cuda"}))
    stock, model = make_decoder(name), make_decoder(name)
    ids, mask = left_padded_batch(stock.config.vocab_size, (9, 4, 6))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    BetterTransformer.transform(model)
    for m in (stock, model):
        with torch.no_grad():
            m(ids, attention_mask=mask, position_ids=positions)
            m(ids, attention_mask=mask)
        m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    BetterTransformer.reverse(model)
    assert not _leftovers(model, stock)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_reverse_leaves_no_attribute_on_an_encoder(model_type):
    stock, model = make_model(model_type), make_model(model_type)
    ids, mask = make_batch(*LAYOUTS["left"])
    BetterTransformer.transform(model)
    for m in (stock, model):
        with torch.no_grad():
            m(input_ids=ids, attention_mask=mask)
    BetterTransformer.reverse(model)
    assert not _leftovers(model, stock)


def test_decode_step_families_implement_the_protocol():
    families = {support.decode_step for support in REGISTRY.values() if support.decode_step is not None}
    assert families
    wanted = {name for name, _ in inspect.getmembers(DecodeStep, inspect.isfunction) if not name.startswith("_")}
    wanted |= {"__init__", "__call__"}
    for family in families:
        for name in wanted:
            ours = getattr(family, name)
            assert ours is not getattr(DecodeStep, name), f"{family.__name__} lacks {name}"
            theirs = inspect.signature(getattr(DecodeStep, name))
            assert list(inspect.signature(ours).parameters) == list(theirs.parameters), (family.__name__, name)


def test_switched_restores_and_refuses_unknown_switches():
    before = (SWITCHES.triton, SWITCHES.attention_backend)
    with switched(triton=False, attention_backend="dense") as switches:
        assert switches.triton is False and SWITCHES.attention_backend == "dense"
    assert (SWITCHES.triton, SWITCHES.attention_backend) == before
    with pytest.raises(TypeError, match="unknown switches"):
        with switched(use_triton=False):
            pass
