"""pytorch-grad-cam's targets: callables of one image's model output (a torch tensor) returning its score. Any such
callable is a target: its gradient with respect to the output, taken by autograd on the values ONNX Runtime returns,
seeds the explainable file's backward pass (base_cam), so that the map is that of the callable's score."""

from __future__ import annotations

import numpy as np
import torch

from ....core.errors import ExplainError


class ClassifierOutputTarget:
    """The output's element `category` (explained in the file's single run, as onnxcam explains a class)."""

    def __init__(self, category):
        self.category = category

    def __call__(self, model_output):
        return model_output[..., self.category]


class ClassifierOutputSoftmaxTarget:
    """The softmax probability of `category`."""

    def __init__(self, category):
        self.category = category

    def __call__(self, model_output):
        return torch.softmax(model_output, dim=-1)[..., self.category]


class ClassifierOutputReST:
    """The logit of `category` minus its cross-entropy (ReST, arXiv 2501.06261)."""

    def __init__(self, category):
        self.category = category

    def __call__(self, model_output):
        logits = model_output if model_output.ndim > 1 else model_output[None]
        target = torch.full((len(logits),), self.category, dtype=torch.long)
        score = logits[:, self.category] - torch.nn.functional.cross_entropy(logits, target, reduction="none")
        return score if model_output.ndim > 1 else score[0]


class BinaryClassifierOutputTarget:
    """A single-logit classifier's output, negated for category 0."""

    def __init__(self, category):
        self.category = category

    def __call__(self, model_output):
        return model_output * (1 if self.category == 1 else -1)


class SoftmaxOutputTarget:
    def __call__(self, model_output):
        return torch.softmax(model_output, dim=-1)


class RawScoresOutputTarget:
    def __call__(self, model_output):
        return model_output


class SemanticSegmentationTarget:
    """The sum of class `category`'s scores over the pixels of `mask` (a numpy array at the output's size)."""

    def __init__(self, category, mask):
        self.category = category
        self.mask = torch.from_numpy(np.asarray(mask))

    def __call__(self, model_output):
        return (model_output[self.category, :, :] * self.mask.to(model_output.device)).sum()


class SimilarityToConceptTarget:
    """The cosine similarity of the output (an embedding) to `concept_features`."""

    def __init__(self, concept_features):
        self.concept_features = torch.as_tensor(concept_features)

    def __call__(self, model_output):
        return torch.nn.functional.cosine_similarity(model_output, self.concept_features.to(model_output), dim=0)


class FinerWeightedTarget:
    """`main_category`'s score against `comparison_categories`, weighted by their softmax probabilities (Finer-CAM)."""

    def __init__(self, main_category, comparison_categories, alpha):
        self.main_category, self.comparison_categories, self.alpha = main_category, comparison_categories, alpha

    def __call__(self, model_output):
        main = model_output[..., self.main_category]
        probabilities = torch.softmax(model_output, dim=-1)
        weights = [probabilities[..., c] for c in self.comparison_categories]
        numerator = sum(w * (main - self.alpha * model_output[..., c])
                        for w, c in zip(weights, self.comparison_categories, strict=True))
        return numerator / (sum(weights) + 1e-9)


class FasterRCNNBoxScoreTarget:
    """Refused: torchvision's Faster R-CNN does not export to an explainable file."""

    def __init__(self, labels, bounding_boxes, iou_threshold=0.5):
        raise ExplainError("FasterRCNNBoxScoreTarget explains torchvision's Faster R-CNN, whose region proposals and "
                           "NMS do not export to an explainable ONNX file here: use pytorch-grad-cam itself for it")
