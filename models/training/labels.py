"""The one table from a data label to the product's finding group, for training and evaluation.

``GROUP_OF_LABEL`` holds the labels that are a finding of ours and train and score as one:
spots (nodule, mass) and shadows (tuberculosis, consolidation, ground glass). ``WEAK_SHADOW``
holds the looser NIH/RSNA kinds (infiltration, pneumonia, lung opacity): their boxes are large
and loose, so they are neither a shadow target nor a negative ("not a negative": their region
is ignored by the shadow channel's loss and by the shadow figures). Every other label
(pleural effusion, pneumothorax, atelectasis, cardiomegaly, …) is not a finding of ours and
not a negative either: its region is ignored by both channels.
"""

from __future__ import annotations

GROUPS = ("spot", "shadow")

GROUP_OF_LABEL: dict[str, str] = {
    "nodule": "spot",
    "mass": "spot",
    "active_tuberculosis": "shadow",
    "obsolete_tuberculosis": "shadow",
    "tuberculosis": "shadow",
    "consolidation": "shadow",
    "ground_glass_opacity": "shadow",
}

WEAK_SHADOW = frozenset({"infiltration", "pneumonia", "lung_opacity", "opacity"})


def unboxed_groups(unboxed: tuple[str, ...]) -> frozenset[str]:
    """The finding groups an image may hold unmarked (NIH-bbox ``unboxed`` labels): a channel
    of such a group learns nothing from the image outside its marked lesions."""
    groups = {GROUP_OF_LABEL[label] for label in unboxed if label in GROUP_OF_LABEL}
    if any(label in WEAK_SHADOW for label in unboxed):
        groups.add("shadow")
    return frozenset(groups)
