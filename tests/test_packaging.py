"""The distribution: folder mapping, imports without the train extras' heavy paths, and
a wheel that holds every module under ``mnemax/``."""

import importlib
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAPPING = {"zoo": "mnemax", "layers": "mnemax/layers", "kernels": "mnemax/kernels", "train": "mnemax/train", "configs": "mnemax/configs"}


def source_modules():
    out = set()
    for folder, target in MAPPING.items():
        for f in (ROOT / folder).rglob("*.py"):  # subpackages too (mnemax.convert, mnemax.train.tasks)
            out.add(f"{target}/{f.relative_to(ROOT / folder).as_posix()}")
    return out


def test_subpackages_import():
    for name in ("mnemax", "mnemax.layers", "mnemax.kernels", "mnemax.train", "mnemax.configs"):
        mod = importlib.import_module(name)
        folder = [k for k, v in MAPPING.items() if v == name.replace(".", "/")][0]
        assert pathlib.Path(mod.__file__).parent.resolve() == (ROOT / folder).resolve(), name


def test_core_does_not_import_training_stack():
    """layers, kernels and the zoo must import where optax/orbax/TFDS/torch are absent."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'optax','orbax','tensorflow_datasets','grain','torch','ml_collections','tensorflow'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mnemax, mnemax.layers, mnemax.kernels, mnemax.convert\n"
        "m = mnemax.create('transformer-tiny')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_wheel_holds_every_module(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    wheels = list(tmp_path.glob("mnemax-*.whl"))
    assert len(wheels) == 1
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    missing = source_modules() - names
    assert not missing, f"modules missing from the wheel: {sorted(missing)}"
