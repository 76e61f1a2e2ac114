"""Data for the experiments: synthetic sine tasks, and real data read from a data root.

Real data are never part of the repository: loaders take ``root`` (else the ``FNTK_DATA``
environment variable) pointing at a folder laid out like the project's ``shared/data``; see
:mod:`fntk.data.paths`. Modules: :mod:`~fntk.data.sine`, :mod:`~fntk.data.malaria`,
:mod:`~fntk.data.faces`, :mod:`~fntk.data.digits`, :mod:`~fntk.data.nets` (source networks).
"""

from fntk.data.paths import ENV_VAR, data_file, default_root, resolve_root

__all__ = ["ENV_VAR", "data_file", "default_root", "resolve_root"]
