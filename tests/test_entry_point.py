"""torch.compile(backend="sparsecc") works in a process that never imports sparsecc itself."""
import subprocess
import sys
import textwrap


def test_backend_is_found_through_the_entry_point():
    script = textwrap.dedent("""
        import sys, torch
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        x = torch.randn(3, 4)
        assert "sparsecc" not in sys.modules
        compiled = torch.compile(m, backend="sparsecc", options={"executor": "eager"})
        compiled(x).square().sum().backward()
        got = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        m(x).square().sum().backward()
        for g, p in zip(got, m.parameters()):
            torch.testing.assert_close(g, p.grad)
        assert "sparsecc" in sys.modules
        import sparsecc
        assert len(sparsecc.reports()) == 1
        print("ENTRY POINT OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ENTRY POINT OK" in out.stdout
