"""Repeats the t = 1 cases of the retention GPU grid (fresh random draws each time) and prints each
failure message: the exactly-zero dq / dk gradients' noise check was seen to fail once (session 16)."""
import sys
sys.path.insert(0, "tests/cuda")
import test_power_retention_cuda as T

cases = [c for c in T.CASES if c[1] == 1]
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
fails = 0
for r in range(reps):
    for c in cases:
        try:
            T.test_forward_and_gradients(c)
        except AssertionError as e:
            fails += 1
            print(T.case_id(c), "rep", r, ":", str(e).splitlines()[0][:300])
print(f"{fails} failures in {reps * len(cases)} runs of {len(cases)} t=1 cases")
