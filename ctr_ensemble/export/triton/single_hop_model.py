"""Triton Python model ``ctr_single_hop``: every member's ONNX session and the fusion, in one process.

The default ``ctr_ensemble`` is a Triton ensemble: the members (the ``onnxruntime`` backend, a Python shim
on the local server) and then the ``fusion`` Python model, so each request crosses the scheduler and the
Python-backend IPC twice. This model does the same work in one hop: the request's rows go through each
member's ONNX Runtime session (``<member>.onnx`` beside this file, hard links of the members' own files) and
the fusion rule of ``ctr_fusion.py`` (the project's reference, ``ctr_ensemble/layers/fusion.py``), the same
function the ``fusion`` model calls, so its output equals the ensemble's.

Config parameters: ``members`` (a JSON list, the ensemble's order), the fusion rule's (``fusion_mode``,
``tau``, ...; ``FusionRule.params``) and ``intra_op_thread_count``. Inputs: the ensemble's; outputs the
fused ``prob`` (B, 1) and ``weights`` (B, N). CPU only: the production container's Python has no
onnxruntime, so there the all-ONNX variant (``ctr_all_onnx``) is the one-hop deployment.
"""

import json
import os
import sys

import numpy as np
import onnxruntime as ort
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from ctr_fusion import FusionRule, fuse  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.name = args["model_name"]
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        try:
            members = json.loads(params.get("members", ""))
            if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
                raise ValueError
        except ValueError:
            self._fail(f"parameter members must be a non-empty JSON list of member names, got {params.get('members')!r}")
        try:
            rule = FusionRule.from_params(params, members=len(members))
        except ValueError as e:
            self._fail(f"fusion parameters: {e}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count", "1") or 0)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.sessions = []
        for m in members:
            path = os.path.join(HERE, f"{m}.onnx")
            if not os.path.isfile(path):
                self._fail(f"member ONNX file {path} not found")
            try:
                self.sessions.append(ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"]))
            except Exception as e:  # onnxruntime raises its own exception types for bad files
                self._fail(f"cannot load {path}: {e}")
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in cfg["input"]]
        self.feeds = [[i.name for i in s.get_inputs()] for s in self.sessions]  # a member may use fewer inputs
        # (B, N) numbers per call: intra-op threads gain nothing and spin on the cores the sessions need.
        torch.set_num_threads(1)
        self.mode, self.values = rule.mode, rule.on(torch.device("cpu"))

    def execute(self, requests):
        # Several requests from the dynamic batcher are one batch: each session runs once for all of them.
        try:
            parts = {name: [] for name, _ in self.inputs}
            sizes = []
            for request in requests:
                for name, dtype in self.inputs:
                    t = pb_utils.get_input_tensor_by_name(request, name)
                    parts[name].append(np.from_dlpack(t).astype(dtype, copy=False))
                sizes.append(parts[self.inputs[0][0]][-1].shape[0])
            feeds = {n: p[0] if len(p) == 1 else np.concatenate(p) for n, p in parts.items()}
            probs = np.concatenate([s.run(["prob"], {n: feeds[n] for n in names})[0]
                                    for s, names in zip(self.sessions, self.feeds)], axis=1)  # (B, N)
            fused, weights = fuse(torch.from_numpy(probs), self.mode, **self.values)  # (B, 1), (B, N)
        except Exception as e:
            err = pb_utils.TritonError(f"model '{self.name}': inference failed: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        responses, start = [], 0
        for n in sizes:
            out = [pb_utils.Tensor.from_dlpack("prob", to_dlpack(fused[start : start + n].contiguous())),
                   pb_utils.Tensor.from_dlpack("weights", to_dlpack(weights[start : start + n].contiguous()))]
            responses.append(pb_utils.InferenceResponse(output_tensors=out))
            start += n
        return responses

    def _fail(self, msg):
        raise pb_utils.TritonModelException(f"model '{self.name}': {msg}")
