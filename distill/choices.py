"""The named choices of losses and augmentations, shared by the configs (flags, recipes) and the code that
implements them; kept free of heavy imports so the command line starts fast."""

DISTILLATION_KINDS = ("none", "soft", "hard", "feature", "soft+feature", "hard+feature")
LABEL_LOSSES = ("ce", "bce")
FEATURE_LOSSES = ("mse", "cosine")
CROPS = ("rrc", "src")
# How a token student's two heads make one prediction: the mean of their logits (timm's forward and the official
# code's) or the mean of their probabilities (the paper's text: the two softmax outputs added).
FUSIONS = ("logits", "softmax")
