"""Session runs through ONNX Runtime's I/O binding, so that each tensor crosses between host and device at most once.

- Inputs: numpy arrays are bound as host memory (read in place on CPU, copied to the GPU once on CUDA).
  OrtValues and DLPack tensors (PyTorch, CuPy, JAX) are bound where they live: a batch already on the
  GPU is not copied back to the host and up again.
- Outputs: only the names asked for are bound; the graph's other outputs stay on the device, never copied.
  Each bound output is written by ONNX Runtime straight into a numpy array allocated here, its shape read
  from the model with the symbolic sizes (the batch) taken from the inputs, so there is no second host copy.
  An output whose shape the model leaves open is allocated by ONNX Runtime and copied out once.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .session import PROVIDERS

NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
               "tensor(bool)": np.bool_}


def as_ortvalue(value) -> ort.OrtValue:
    """An OrtValue sharing the tensor's memory: OrtValues pass through, DLPack tensors are wrapped, not copied."""
    if isinstance(value, ort.OrtValue):
        return value
    if hasattr(value, "__dlpack__"):
        try:
            return ort.OrtValue.from_dlpack(value)
        except RuntimeError as error:
            if "contiguous" in str(error).lower():
                raise ValueError("ONNX Runtime binds contiguous tensors only: pass a contiguous one "
                                 "(tensor.contiguous() in PyTorch)") from None
            raise
    raise TypeError(f"cannot bind a {type(value).__name__}: give a numpy array, an OrtValue or a DLPack tensor")


def host_array(batch) -> np.ndarray:
    """The batch as a host array (OrtValues and device tensors are copied once)."""
    return batch if isinstance(batch, np.ndarray) else np.ascontiguousarray(batch.numpy())


def shape_of(value: np.ndarray | ort.OrtValue) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, np.ndarray) else tuple(value.shape())


def runner_for(session) -> Runner:
    """The runner of a session: through I/O binding on ONNX Runtime's, with host arrays on OpenVINO's."""
    return BoundRunner(session) if isinstance(session, ort.InferenceSession) else HostRunner(session)


class HostRunner:
    """Runs a session that reads host arrays only (runtimes.openvino): OrtValues and DLPack tensors are copied
    to the host first."""

    device = "cpu"

    def __init__(self, session):
        self.session = session

    def run(self, names: list[str], feeds: dict) -> list[np.ndarray]:
        return self.session.run(names, {name: value if isinstance(value, np.ndarray) else as_ortvalue(value).numpy()
                                        for name, value in feeds.items()})


class BoundRunner:
    """Runs one session through I/O binding; safe to call from several threads (one binding per run)."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.device = "cuda" if session.get_providers()[0] == PROVIDERS["cuda"] else "cpu"
        self._input_shapes = {i.name: i.shape for i in session.get_inputs()}
        self._outputs = {o.name: (o.shape, NUMPY_TYPES.get(o.type)) for o in session.get_outputs()}

    def run(self, names: list[str], feeds: dict) -> list[np.ndarray]:
        """The outputs `names` as host numpy arrays, for inputs given as numpy arrays, OrtValues or DLPack tensors."""
        feeds = {name: value if isinstance(value, np.ndarray) else as_ortvalue(value) for name, value in feeds.items()}
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        if any(not isinstance(v, np.ndarray) and v.device_name().lower() != "cpu" for v in feeds.values()):
            # a tensor made on another CUDA stream (PyTorch's) may still be in the making: ONNX Runtime's
            # stream does not wait for it, so the device is synchronised first
            binding.synchronize_inputs()
        sizes = self._symbolic_sizes(feeds)
        arrays = []
        for name in names:
            array = self._host_array(name, sizes)
            if array is None:
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
            arrays.append(array)
        self.session.run_with_iobinding(binding)
        if any(array is None for array in arrays):
            values = binding.get_outputs()
            arrays = [value.numpy() if array is None else array for array, value in zip(arrays, values, strict=True)]
        return arrays

    def _symbolic_sizes(self, feeds: dict) -> dict[str, int]:
        """The value of each named dimension ('batch', ...) of the model's inputs, read off the feeds."""
        sizes = {}
        for name, value in feeds.items():
            for declared, actual in zip(self._input_shapes.get(name, ()), shape_of(value), strict=False):
                if isinstance(declared, str):
                    sizes[declared] = actual
        return sizes

    def _host_array(self, name: str, sizes: dict[str, int]) -> np.ndarray | None:
        """An empty array for output `name`, or None where its shape or type is not known before the run
        (or the name is unknown: ONNX Runtime then says so)."""
        if name not in self._outputs:
            return None
        declared, dtype = self._outputs[name]
        shape = [sizes.get(d) if isinstance(d, str) else d for d in declared]
        if dtype is None or any(d is None for d in shape):
            return None
        return np.empty(shape, dtype)


Runner = BoundRunner | HostRunner
