"""Which output tile a GEMM program computes: the grouped ("super-row") order both GEMMs use."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` over a num_pid_m x num_pid_n grid of tiles, walked GROUP_M
    row blocks at a time, column block by column block: the programs resident together share B
    column blocks (several row blocks) and A row blocks (several column blocks) in L2."""
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n
