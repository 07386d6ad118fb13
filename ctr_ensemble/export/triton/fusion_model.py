"""Triton Python model: negation-entropy confidence fusion of member probabilities.

Config parameters: ``fusion_mode`` (negation_entropy | mean) and ``tau``. Inputs are the
members' ``prob`` tensors in config order, outputs the fused ``prob`` (B, 1) and the
member ``weights`` (B, N). Tensors move by DLPack; on a KIND_GPU instance the math runs
on that GPU with torch, on CPU otherwise, and inputs may arrive on either device.
The math is ``ctr_fusion.py`` beside this file, a copy of the project's reference fusion.
"""

import json
import os
import sys

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ctr_fusion import MODES, fuse  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.name = args["model_name"]
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        self.mode = params.get("fusion_mode", "negation_entropy")
        if self.mode not in MODES:
            raise pb_utils.TritonModelException(f"model '{self.name}': fusion_mode {self.mode!r} is not one of {MODES}")
        try:
            self.tau = float(params.get("tau", "1.0"))
        except ValueError:
            raise pb_utils.TritonModelException(f"model '{self.name}': tau must be a number, got {params.get('tau')!r}")
        if not self.tau >= 0:
            raise pb_utils.TritonModelException(f"model '{self.name}': tau must be >= 0, got {self.tau}")
        self.inputs = [i["name"] for i in cfg["input"]]
        if args.get("model_instance_kind") == "GPU":
            if not torch.cuda.is_available():
                raise pb_utils.TritonModelException(f"model '{self.name}': KIND_GPU instance but torch sees no CUDA device")
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                cols = []
                for name in self.inputs:
                    t = from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack())
                    cols.append(t.to(self.device, torch.float32).reshape(-1))
                probs = torch.stack(cols, dim=1)  # (B, N)
                fused, weights = fuse(probs, self.mode, self.tau)
                out = [
                    pb_utils.Tensor.from_dlpack("prob", to_dlpack(fused.contiguous())),
                    pb_utils.Tensor.from_dlpack("weights", to_dlpack(weights.contiguous())),
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=out))
            except Exception as e:  # one bad request must not fail the others
                err = pb_utils.TritonError(f"model '{self.name}': fusion failed: {e}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=err))
        return responses
