"""minitodi: token-wise knowledge distillation (ToDi) from scratch, in NumPy or CuPy.

Every divergence's gradient w.r.t. the student's logits is derived by hand (see ``losses``) and
checked against finite differences (see ``gradcheck``).
"""

__version__ = "0.1.0"
