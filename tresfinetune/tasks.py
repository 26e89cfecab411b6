"""The two kinds of classification the tool trains; every module names them with these constants."""

SINGLE_LABEL = "single-label"  # one class per image: softmax, top-1/top-5
MULTI_LABEL = "multi-label"  # any number of classes per image: sigmoid, mAP; targets 1 / 0 / -1 (unknown)
