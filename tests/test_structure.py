"""The package's import structure: no cycles, no private names across modules, no upward
imports (kernels <- layers <- zoo <- configs <- train), no GPU module imported by a TPU one
or the reverse, no training stack in the layers and kernels, and no module-level mutable
state in the kernels (see tests/structure.py)."""

import os
import textwrap

from . import structure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_module_of_every_folder_is_seen():
    mods = structure.modules(ROOT)
    for name in ("mnemax", "mnemax.layers.mamba", "mnemax.kernels.dispatch", "mnemax.train.trainer",
                 "mnemax.configs.base", "mnemax.convert"):
        assert name in mods, name
    assert not any(name.startswith("mnemax.mnemax") or ".layers.layers" in name for name in mods)
    assert mods["mnemax.layers.mamba"].layer == "layers" and mods["mnemax.convert"].layer == "zoo"


def test_the_package_has_no_cycles_private_or_upward_imports():
    report = structure.check(ROOT)
    assert not report.problems, "\n".join(report.problems)
    # the graph is real: known edges are there
    assert "mnemax.kernels.checks" in report.edges["mnemax.layers.base"]


def test_no_module_level_mutable_state_in_the_kernels():
    found = structure.module_mutables(ROOT, "kernels")
    assert not found, "\n".join(found)


def _package(tmp_path, files: dict[str, str]) -> dict[str, str]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return {"pkg": "zoo", "pkg.kernels": "kernels", "pkg.layers": "layers"}


def test_the_check_finds_what_it_forbids(tmp_path):
    """A package made of the mistakes the check exists for: each is reported, and the
    same package without them is clean."""
    mapping = _package(tmp_path, {
        "zoo/__init__.py": "from . import model\n",
        "zoo/model.py": "from .registry import get\n",
        "zoo/registry.py": "def get():\n    from . import model  # a lazy import back: still a cycle\n    return model\n",
        "kernels/__init__.py": "",
        "kernels/a.py": "from .b import _helper\nimport optax\n",
        "kernels/b.py": "OPTIONS = {'chunk': 8}\n_helper = 1\n",
        "kernels/op_gpu.py": "from . import b\n",
        "kernels/op_tpu.py": "from .op_gpu import b  # the TPU kernels reaching into the GPU module\n",
        "layers/__init__.py": "",
        "layers/x.py": "from pkg.layers import y\nfrom pkg import model\nv = y._hidden\n",
        "layers/y.py": "_hidden = 2\nTABLE = [1, 2]\n__all__ = ['z']\n",
    })
    report = structure.check(str(tmp_path), mapping)
    assert report.cycles == [["pkg.model", "pkg.registry"]]
    assert len(report.private) == 2 and any("_helper" in p for p in report.private) and any(
        "y._hidden" in p for p in report.private)
    assert len(report.upward) == 1 and "pkg.model" in report.upward[0]
    assert len(report.heavy) == 1 and "optax" in report.heavy[0]
    assert len(report.cross_platform) == 1 and "pkg.kernels.op_tpu imports pkg.kernels.op_gpu" in report.cross_platform[0]
    mutables = structure.module_mutables(str(tmp_path), "kernels", mapping)
    assert len(mutables) == 1 and "OPTIONS" in mutables[0]
    assert structure.module_mutables(str(tmp_path), "layers", mapping)[0].startswith(os.path.join("layers", "y.py"))

    # the fixed package: the registry imports nothing back, public names, no upward import
    (tmp_path / "zoo/registry.py").write_text("def get():\n    return None\n")
    (tmp_path / "kernels/a.py").write_text("from .b import helper\n")
    (tmp_path / "kernels/b.py").write_text("OPTIONS = (('chunk', 8),)\nhelper = 1\n")
    (tmp_path / "layers/x.py").write_text("from pkg.layers import y\nv = y.hidden\n")
    (tmp_path / "layers/y.py").write_text("hidden = 2\n")
    (tmp_path / "kernels/op_tpu.py").write_text("from . import b\n")
    clean = structure.check(str(tmp_path), mapping)
    assert not clean.problems, clean.problems
    assert clean.edges["pkg.model"] == {"pkg.registry"} and clean.edges["pkg.layers.x"] == {"pkg.layers.y"}
    assert not structure.module_mutables(str(tmp_path), "kernels", mapping)
