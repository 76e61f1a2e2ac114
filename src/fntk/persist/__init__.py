"""Saving and loading fitted adapters (:class:`~fntk.NTKRegressor`, :class:`~fntk.LinearizedClassifier`).

File format (one file, written with ``torch.save`` and readable with ``torch.load(weights_only=True)``,
so loading never unpickles code)::

    {"format": "fntk-adapter", "meta": <JSON string>, "state": <JSON string>, "tensors": {key: Tensor},
     "checksum": <sha256 hex>}

``meta`` is human-readable: fntk version, class, hyperparameters, the parameter selection, the
model's parameter names and shapes, and sha256 hashes of θ̂ (the selected parameters) and of the
whole model (parameters and buffers). ``state`` is the fitted object's attributes encoded as JSON,
with tensors referenced by key into ``tensors``. Every class whose objects may appear in a state
is registered here under a stable *kind* name (:func:`register`, independent of where the class
lives in the package); only registered classes are rebuilt (by ``__new__`` and attribute
assignment, never by running code from the file), and saving any other object is refused. A
class exports its own state with ``__fntk_state__()`` (default: its attributes) and rebuilds what
cannot be stored (operators, generators) in ``__fntk_restore__()``. Files of format 1 (fntk 0.1.0,
which named classes by module path) are read through a table of those paths. The
:class:`~fntk.Linearized` is not stored: :func:`load` rebuilds it from the model you pass, after
checking that the model's parameter names, shapes and values hash to what was saved. Because the
fitted factorisations themselves are stored, predictions after a round trip are bitwise identical.

``checksum`` (format 3 on) is an sha256 over the meta and state strings and every stored
tensor's key, dtype, shape and bytes; :func:`load` verifies it first and refuses a file whose
contents changed (one flipped bit is enough), naming it. Files of formats 1 and 2 have none and
still load. Files are written atomically (:func:`atomic_write`: a temporary file in the same
folder, flushed and fsync'ed, then ``os.replace``), so an interrupted or failed save leaves any
previous file at that path intact.

The model itself is never written: the file holds what fntk learned, not the network.

Modules: :mod:`.adapter` (save, load, read_metadata), :mod:`.codec` (the state classes and their
JSON encoding), :mod:`.hashing` (model fingerprints, the file checksum, the working linearization
of low-precision models), :mod:`.files` (path checks, atomic writes; also used for the
experiments' caches).
"""

from fntk.persist.adapter import load, read_metadata, save
from fntk.persist.codec import FORMAT, FORMAT_VERSION, register
from fntk.persist.files import atomic_write, check_path
from fntk.persist.hashing import LOW_PRECISION, model_hashes, tensor_hash, working_linearization

__all__ = [
    "save",
    "load",
    "read_metadata",
    "tensor_hash",
    "model_hashes",
    "register",
    "atomic_write",
    "check_path",
    "working_linearization",
    "LOW_PRECISION",
    "FORMAT",
    "FORMAT_VERSION",
]
