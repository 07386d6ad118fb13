"""A Python-based Triton backend named ``onnxruntime`` that runs ``model.onnx`` with ONNX Runtime.

The ``tritonserver`` binary in the nvidia-pytriton wheel has no native onnxruntime
backend. Triton falls back to ``<backend-directory>/onnxruntime/model.py`` for a model
whose config says ``backend: "onnxruntime"``, so the same repository runs unchanged here
and on the NGC container, whose native backend wins there. Installed by
``ctr-ensemble serve`` into its backend directory; it is not part of the repository.

Tensors: inputs are read by DLPack (``np.from_dlpack``), never ``as_numpy()``, which returns
wrong values when the serving Python has numpy 2 (the stub is built against numpy 1). Outputs go
back by DLPack under numpy 2; under numpy 1, whose DLPack capsules the stub cannot release,
as ``pb_utils.Tensor(name, ndarray)``, which is correct there.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


def _to_numpy(tensor):
    """A CPU input tensor as a numpy array, by DLPack (the members' inputs are on the host)."""
    return np.from_dlpack(tensor)


def _to_triton(name, array):
    """An output tensor: by DLPack under numpy 2; ``Tensor(name, ndarray)`` is right only under numpy 1."""
    array = np.ascontiguousarray(array)
    if NUMPY_2:
        return pb_utils.Tensor.from_dlpack(name, array)
    return pb_utils.Tensor(name, array)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.name = args["model_name"]
        fname = cfg.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], fname)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"model '{self.name}': ONNX file {path} not found")
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count", "0") or 0)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one small graph per call: no inter-op pool
        try:
            self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise pb_utils.TritonModelException(f"model '{self.name}': cannot load {path}: {e}")
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        graph_in = {i.name for i in self.session.get_inputs()}
        graph_out = {o.name for o in self.session.get_outputs()}
        missing = [n for n, _ in self.inputs if n not in graph_in] + [n for n in self.outputs if n not in graph_out]
        if missing:
            raise pb_utils.TritonModelException(
                f"model '{self.name}': config names {missing} that {path} does not have "
                f"(graph inputs {sorted(graph_in)}, outputs {sorted(graph_out)})"
            )

    def execute(self, requests):
        # The dynamic batcher hands over several requests: run them as one ONNX batch. Only the outputs some
        # request asked for leave the session: the ensemble wants ``prob``, and ``repr`` (B, H) would otherwise
        # be copied into shared memory on every call for nothing.
        feeds = {name: [] for name, _ in self.inputs}
        sizes, asked, wanted = [], [], set()
        for request in requests:
            for name, dtype in self.inputs:
                feeds[name].append(_to_numpy(pb_utils.get_input_tensor_by_name(request, name)).astype(dtype, copy=False))
            sizes.append(feeds[self.inputs[0][0]][-1].shape[0])
            asked.append(set(request.requested_output_names() or self.outputs))
            wanted |= asked[-1]
        outputs = [o for o in self.outputs if o in wanted] or self.outputs
        try:
            merged = {name: parts[0] if len(parts) == 1 else np.concatenate(parts) for name, parts in feeds.items()}
            results = self.session.run(outputs, merged)
        except Exception as e:
            err = pb_utils.TritonError(f"model '{self.name}': inference failed: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        responses = []
        start = 0
        for n, names in zip(sizes, asked):
            tensors = [_to_triton(name, r[start : start + n]) for name, r in zip(outputs, results) if name in names]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
