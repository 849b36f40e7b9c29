"""optim/sam.py stays one a newcomer can hold in their head (issue 21): a size limit on
the file and on every function in it, one object for a step's state, and no
collaborator handed the SAM object."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re

import pytest
import torch

import samkit
from samkit.optim import _step, sam

OPTIM = pathlib.Path(sam.__file__).parent
MAX_FILE_LINES = 650
MAX_FUNCTION_LINES = 40  # statements, the docstring not counted


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0  # type: ignore[operator]


def test_sam_py_is_under_its_size_limits():
    source = pathlib.Path(sam.__file__).read_text()
    assert len(source.splitlines()) <= MAX_FILE_LINES
    sizes = {f.name: _body_lines(f) for f in _functions(ast.parse(source))}
    assert sizes and "first_step" in sizes and "step" in sizes
    too_long = {name: n for name, n in sizes.items() if n > MAX_FUNCTION_LINES}
    assert not too_long, f"over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_the_limit_check_counts_what_it_claims():
    tree = ast.parse('def f():\n    """doc\n\n    more"""\n    a = 1\n\n    return a\n')
    (f,) = _functions(tree)
    assert _body_lines(f) == 3


def _self_attributes_set(tree: ast.AST) -> set[str]:
    """Names ``self.<name> = ...`` is assigned to anywhere (tuple targets included)."""
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            for t in ast.walk(target):
                if (
                    isinstance(t, ast.Attribute)
                    and isinstance(t.value, ast.Name)
                    and t.value.id == "self"
                ):
                    out.add(t.attr)
    return out


def test_no_per_step_state_is_left_on_the_optimizer():
    """The step's flags live in one Step; SAM sets only its settings, counters and buffers."""
    step_fields = {f.name for f in dataclasses.fields(_step.Step)}
    tree = ast.parse(pathlib.Path(sam.__file__).read_text())
    assigned = _self_attributes_set(tree)
    loose = {"_pending", "_skip", "_unscaled", "_first_pass_scaled", "_local_first_pass", "_cleared",
             "_perturbed", "_bn_ctx", "_found_per_device", "_group_copies", "_large_radius"}  # fmt: skip
    assert not assigned & loose
    assert not assigned & {f"_{name}" for name in step_fields}
    assert assigned <= {
        "base_optimizer", "_sam_defaults", "group_keys", "rho_key", "_sharded", "perturbation",
        "policy", "mix", "rho_controller", "model", "ddp_ascent", "max_grad_norm", "skip_nonfinite",
        "foreach", "ascent_eps", "steps", "ascents", "_backups", "_scratch", "_rho_groups", "_step",
        "_opt_called",
    }  # fmt: skip
    # between steps the optimizer holds no step, and its state is what it was built with
    w = torch.nn.Parameter(torch.ones(3))
    opt = samkit.SAM(torch.optim.SGD([w], lr=0.1), rho=0.1)
    before = set(vars(opt))

    def closure():
        loss = (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt._step is None and set(vars(opt)) - before <= {"_step", "_opt_called"}


def test_no_collaborator_is_handed_the_sam_object():
    """``bind(self)`` and friends: no perturbation, policy, mix or controller call gets ``self``."""
    pieces = ("perturbation", "policy", "mix", "rho_controller")
    for path in sorted(OPTIM.glob("*.py")):
        text = path.read_text()
        assert "bind(self)" not in text, path.name
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value
            if isinstance(owner, ast.Attribute) and owner.attr in pieces:
                args = [*node.args, *(k.value for k in node.keywords)]
                handed = [a for a in args if isinstance(a, ast.Name) and a.id == "self"]
                assert not handed, f"{path.name}:{node.lineno} hands self to {owner.attr}"
    source = pathlib.Path(sam.__file__).read_text()
    assert not re.search(r"_sam_group|_reread_groups|_group_copies", source)


def test_a_rho_controller_sees_groups_not_the_optimizer():
    seen = []

    class Spy(samkit.RhoController):
        def bind(self, groups):
            super().bind(groups)
            seen.append(groups)

        def begin_step(self, view):
            seen.append(view.groups)
            for group in view.groups.param_groups:
                group[view.groups.rho_key] = 0.25

    w = torch.nn.Parameter(torch.ones(2))
    opt = samkit.SAM(torch.optim.Adadelta([w]), rho=Spy(0.1))  # Adadelta: rho under "sam_rho"
    w.grad = torch.ones(2)
    assert opt.first_step()
    assert opt.perturbed and not isinstance(seen[0], torch.optim.Optimizer)
    assert seen[0] is seen[1] and seen[0].rho_key == "sam_rho"
    assert opt.param_groups[0]["sam_rho"] == 0.25 and opt.param_groups[0]["rho"] == 0.9
    # the ascent read the radius the controller wrote (e = 0.25 g / ||g||)
    expected = torch.ones(2) + 0.25 * torch.ones(2) / torch.ones(2).norm()
    assert torch.allclose(w.detach(), expected)
    opt.abort_step()


def test_the_step_moves_through_its_states():
    """no step -> AT_W -> PERTURBED / PLAIN -> no step, as optim/_step.py draws it."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = samkit.SAM(torch.optim.SGD([w], lr=0.1), rho=0.1)

    def backward():
        (w**2).sum().backward()

    assert opt._step is None and not opt._pending
    with opt.first_pass():  # AT_W: records how the pass ran; no step is open yet
        backward()
    assert opt._step is not None and not opt._step.opened and not opt._pending
    opt.state_dict()  # allowed: the weights are at w
    assert opt.first_step()  # PERTURBED
    assert opt._pending and opt.perturbed and opt._step.opened
    with pytest.raises(RuntimeError, match="first_pass"):
        with opt.first_pass():
            pass
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    backward()
    opt.second_step(zero_grad=True)
    assert opt._step is None and opt.steps == 1 and opt.ascents == 1
    opt.param_groups[0]["rho"] = 0.0  # PLAIN: the step opens, the weights stay at w
    backward()
    assert not opt.first_step(zero_grad=False)
    assert opt._pending and not opt.perturbed
    opt.abort_step()
    assert opt._step is None and opt.steps == 1
    opt.abort_step()  # no step: nothing to do
    assert opt._step is None
