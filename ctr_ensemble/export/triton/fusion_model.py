"""Triton Python model: confidence fusion of the members.

Config parameters: ``fusion_mode``, one of ``ctr_fusion.FUSION_MODES``:

- a rule of the registry ``ctr_fusion.RULES`` with its parameters (``FusionRule.params``): inputs are the
  members' ``<m>_prob`` (B, 1) in config order.
  ``negation_entropy`` | ``mean`` (with ``tau``): fused p = Σ w_i·p_i with w = softmax(NE(p)/τ) (or 1/N).
  ``fitted`` (with ``tau``, ``priors`` a JSON list, one per member in input order, and ``space`` prob |
  logit): w = softmax(a_i + NE(p_i)/τ); p = Σ w_i·p_i, or σ(Σ w_i·logit p_i) in logit space.
- ``collaborative`` (with ``head_file``, default ``HEAD_FILE`` = ``head.pt`` in this version folder): inputs are every
  member's ``<m>_prob`` (B, 1), then every member's ``<m>_repr`` (B, H_m); the trained CETNet head
  (arXiv 2411.13700) predicts from [w_1·h_1 ‖ … ‖ w_N·h_N] (or the weighted sum). The head file is
  checked against its ``.sha256`` sidecar.

Outputs: the fused ``prob`` (B, 1) and the member ``weights`` (B, N). Tensors move by DLPack; on a
KIND_GPU instance the math runs on that GPU with torch, on CPU otherwise, and inputs may arrive
on either device. The math is ``ctr_fusion.py`` beside this file, a copy of the project's reference
(``ctr_ensemble/layers/fusion.py``); this file imports nothing else of the project.
"""

import hashlib
import io
import json
import os
import sys

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from ctr_fusion import COLLABORATIVE, FUSION_MODES, HEAD_FILE, FusionRule, fuse, head_from_payload  # noqa: E402


class TritonPythonModel:
    """The fusion step of the ``ctr_ensemble`` ensemble (Triton requires this class name)."""

    def initialize(self, args):
        """Called once when an instance is loaded: everything the config says is parsed and checked here.

        Parameters
        ----------
        args : dict
          Both keys and values are strings: ``model_config`` (the config as JSON), ``model_instance_kind``
          (CPU | GPU), ``model_instance_device_id``, ``model_repository``, ``model_version``, ``model_name``.

        Raises ``pb_utils.TritonModelException`` naming the model and what is wrong (the instance does not load).
        """
        cfg = json.loads(args["model_config"])
        self.name = args["model_name"]
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        mode = params.get("fusion_mode", "negation_entropy")
        if mode not in FUSION_MODES:
            self._fail(f"fusion_mode {mode!r} is not one of {FUSION_MODES}")
        names = [i["name"] for i in cfg["input"]]
        self.inputs = [n for n in names if n.endswith("_prob")]
        self.repr_inputs = [n for n in names if n.endswith("_repr")]
        if not self.inputs:
            self._fail(f"no member inputs <member>_prob among its inputs {names}")
        if args.get("model_instance_kind") == "GPU":
            if not torch.cuda.is_available():
                self._fail("KIND_GPU instance but torch sees no CUDA device")
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")
            # A request is (B, N) numbers: intra-op threads gain nothing, and their spin-waiting steals the
            # cores the members need (measured: fusion compute 0.7 -> 3.3 ms with 2 instances on 2 cores).
            torch.set_num_threads(1)
        if mode == COLLABORATIVE:
            self.fuse = self._head_fusion(os.path.join(HERE, params.get("head_file", HEAD_FILE)))
            return
        try:
            rule = FusionRule.from_params(params, members=len(self.inputs))
        except ValueError as e:
            self._fail(f"fusion parameters: {e}")
        self.fuse = self._rule_fusion(rule)

    def execute(self, requests):
        """Fuse the member outputs of each request.

        Parameters
        ----------
        requests : list
          ``pb_utils.InferenceRequest`` objects, each with the inputs of the config.

        Returns
        -------
        list
          One ``pb_utils.InferenceResponse`` per request, in order: ``prob`` (B, 1) and ``weights`` (B, N), or
          an error response for a request that cannot be fused (the others are still answered).
        """
        if len(requests) > 1 and not self.repr_inputs:
            # Requests the scheduler hands over together are fused as one (B, N) batch: one call into torch.
            try:
                cols = [[self._column(r, n).reshape(-1) for n in self.inputs] for r in requests]
                sizes = [c[0].shape[0] for c in cols]
                probs = torch.cat([torch.stack(c, dim=1) for c in cols])  # (ΣB, N)
                fused, weights = self.fuse(probs, None)
            except Exception:  # one malformed request: answer each on its own below, so only it fails
                pass
            else:
                return [self._response(f, w) for f, w in zip(torch.split(fused, sizes), torch.split(weights, sizes))]
        responses = []
        for request in requests:
            try:
                probs = torch.stack([self._column(request, n).reshape(-1) for n in self.inputs], dim=1)  # (B, N)
                responses.append(self._response(*self.fuse(probs, request)))
            except Exception as e:  # one bad request must not fail the others
                err = pb_utils.TritonError(f"model '{self.name}': fusion failed: {e}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=err))
        return responses

    @staticmethod
    def _response(fused, weights):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor.from_dlpack("prob", to_dlpack(fused.contiguous())),
            pb_utils.Tensor.from_dlpack("weights", to_dlpack(weights.contiguous())),
        ])

    def _fail(self, msg):
        raise pb_utils.TritonModelException(f"model '{self.name}': {msg}")

    def _column(self, request, name):
        t = from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack())
        return t.to(self.device, torch.float32)

    def _rule_fusion(self, rule):
        """The rule as a function (probs (B, N), request) → (fused (B, 1), weights (B, N)); its per-member
        parameters live on the instance's device as the tensors ``fuse`` would build per request."""
        mode, values = rule.mode, rule.on(self.device)
        return lambda probs, request: fuse(probs, mode, **values)

    def _head_fusion(self, path):
        """The collaborative fusion: the trained head loaded from ``path`` (checksum verified) as a function
        (probs (B, N), request) → (fused (B, 1), weights (B, N)) that reads the request's ``<m>_repr``."""
        def fail(msg):
            self._fail(f"head {path}: {msg}")

        if not os.path.isfile(path):
            fail("file not found")
        with open(path, "rb") as f:
            data = f.read()
        sha = path + ".sha256"
        if not os.path.isfile(sha):
            fail("checksum sidecar .sha256 not found")
        with open(sha) as f:
            want = f.read().split()  # more than one digest only after an interrupted write (files.write_atomic)
        if hashlib.sha256(data).hexdigest() not in want:
            fail("corrupt (sha256 does not match its .sha256)")
        try:
            head, members = head_from_payload(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        except Exception as e:
            fail(f"not a usable collaborative head ({type(e).__name__}: {e})")
        expected = [n[: -len("_prob")] for n in self.inputs]
        if members != expected or [n[: -len("_repr")] for n in self.repr_inputs] != expected:
            fail(f"trained for members {members}, but the model's inputs are {self.inputs + self.repr_inputs}")
        head = head.to(self.device).eval()

        @torch.no_grad()
        def fuse_head(probs, request):
            logit, weights = head(probs, [self._column(request, n) for n in self.repr_inputs])  # reprs [(B, H_i)]
            return torch.sigmoid(logit), weights

        return fuse_head
