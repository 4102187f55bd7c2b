"""`fastattn check` (fastattn.checks): every op on every backend against the float64 reference passes on the CPU
backends, and a kernel that is off is reported FAIL (exit code 1)."""
import torch

import fastattn
import fastattn.__main__
from fastattn import checks
from fastattn.__main__ import main


def test_every_op_passes_on_the_cpu_backends():
    rows, failed = checks.run(["cpu", "reference"], lambda name: "cpu")
    assert failed == 0, [r for r in rows if r[-1] != "ok"]
    assert {r[0] for r in rows} == set(checks.CHECKS)
    assert all(r[-1] == "ok" for r in rows)


def test_a_wrong_kernel_fails(monkeypatch, capsys):
    real = fastattn.attention_varlen
    monkeypatch.setattr(fastattn, "attention_varlen", lambda *a, **kw: real(*a, **kw) * 1.1)  # 10 % off
    rows, failed = checks.run(["cpu"], lambda name: "cpu")
    assert {r[0] for r in rows if r[-1] == "FAIL"} == {"attention_varlen"} and failed == 3
    monkeypatch.setattr(fastattn.__main__, "available_backends", lambda: ["cpu"])  # (not Triton's interpreter)
    assert main(["check"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_unsupported_inputs_are_listed(monkeypatch):
    def refuse(backend, device, dtype):
        raise fastattn.BackendNotSupported("no")
    monkeypatch.setitem(checks.CHECKS, "attention", (refuse, (torch.float32,)))
    rows, failed = checks.run(["cpu"], lambda name: "cpu")
    assert failed == 0 and ["attention", "cpu", "float32", "-", "-", "not supported"] in rows
