"""The optional TFDS source explains how to install its dependency when it is missing."""

import importlib.util

import pytest

from jaxbatch.data import tfds_source


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is not None,
    reason="tensorflow_datasets is installed, so the missing-dependency path cannot occur",
)
def test_missing_tfds_raises_install_hint():
    with pytest.raises(ImportError, match="pip install tensorflow-datasets") as info:
        tfds_source.tfds_data_source("imagenet2012", split="train")
    assert isinstance(info.value.__cause__, ImportError)
