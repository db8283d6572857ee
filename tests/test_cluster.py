import importlib.util

import pytest

from pzscale.cluster import connect
from pzscale.errors import PzscaleError


@pytest.mark.skipif(importlib.util.find_spec("dask_cuda") is not None, reason="dask-cuda is installed here")
def test_cuda_cluster_without_dask_cuda_says_what_to_install():
    with pytest.raises(PzscaleError, match=r"pip install 'pzscale\[gpu\]'"):
        connect(cuda=True, quiet=True)
