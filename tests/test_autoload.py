"""The start-up hook that makes anomalib find ADFA without an explicit import."""

import subprocess
import sys

import pytest

# Prints which plugin modules are loaded and what anomalib's model lookup finds.
PROBE = """
import sys
{statement}
plugin = ("anomalib_adfa.lightning_model", "anomalib_adfa.data")
print(*(name.rpartition(".")[2] if name in sys.modules else "-" for name in plugin))
if "anomalib.models" in sys.modules:
    from anomalib.models import get_model
    model = get_model("adfa", backbone="tf_efficientnet_lite0", pre_trained=False)
    watching = any(type(finder).__name__ == "_AnomalibModelsFinder" for finder in sys.meta_path)
    print(type(model).__module__, type(model).__name__, "watching" if watching else "done")
"""


def _probe(statement: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", PROBE.format(statement=statement)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


def test_plugin_is_not_imported_without_anomalib() -> None:
    assert _probe("import json") == ["-", "-"]


@pytest.mark.parametrize(
    "statement",
    [
        "import anomalib.models",
        # anomalib.models first imported from inside the plugin: the hook must wait for the plugin module.
        "from anomalib_adfa import AdfaModel",
    ],
)
def test_anomalib_models_finds_adfa(statement: str) -> None:
    assert _probe(statement) == ["lightning_model", "data", "anomalib_adfa.lightning_model", "Adfa", "done"]


LOOKUP = """
from anomalib.data import get_datamodule
from anomalib.models import get_model
import anomalib.models, anomalib.data
model = get_model({"class_path": "Adfa", "init_args": {"backbone": "tf_efficientnet_lite0", "pre_trained": False}})
datamodule = get_datamodule({"class_path": "BrainMRI", "init_args": {"root": "nowhere"}})
print(type(model).__module__, type(datamodule).__module__, anomalib.data.Folder.__module__)
"""


def test_get_model_and_get_datamodule_find_the_plugin_by_class_path() -> None:
    # anomalib's benchmark builds models and datamodules from a config's class_path this way.
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", LOOKUP], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [
        "anomalib_adfa.lightning_model",
        "anomalib_adfa.data.brainmri",
        "anomalib.data.datamodules.image.folder",
    ]
