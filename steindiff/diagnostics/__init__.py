"""Per-step diagnostics: Jacobian norms (Krylov), the step maps' Lipschitz constants, the reference ODE solution."""
