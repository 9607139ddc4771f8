"""mttlite — Dataset Distillation by Matching Training Trajectories, small and exact.

One module per stage of the method (Cazenavette et al., CVPR 2022):

====================  ===============================================================
``data``, ``zca``     real data sets as resident tensors; ZCA whitening
``networks``          ConvNet (the paper's) and the cross-architecture models
``augment``           DSA, differentiable siamese augmentation
``experts``           stage 1: expert trajectories;  ``buffers``: their on-disk format
``student``           stage 2: the unrolled student
``matching``          stage 3: the normalised parameter-matching loss
``meta_gradient``     ∂L/∂(pixels, α): full unroll, or the exact constant-memory adjoint
``distill``           stage 4: learning the pixels and α (the outer loop)
``evaluate``          the field's evaluation protocol;  ``synset``: the distilled set
``importers``         sets made elsewhere;  ``swaps``: DC-Bench swaps;  ``scores``: DD-Ranking's LRS, ARS
====================  ===============================================================
"""
__version__ = "0.1.0"
