"""fbgemm_gpu 1.6.0 unpacked in /tmp/site without its inference library: its sparse_ops registers
fake kernels of that library's ops at import; skip ops that are not there. Quiet its version warning."""

import sys

site = sys.argv[1]
p = f"{site}/fbgemm_gpu/sparse_ops.py"
s = open(p).read()
old = """        for dkey in ["CompositeImplicitAutograd", "Meta"]:
            if torch._C._dispatch_has_kernel_for_dispatch_key(op_name, dkey):
                return
        torch.library.register_fake(op_name, fn)"""
new = """        try:
            for dkey in ["CompositeImplicitAutograd", "Meta"]:
                if torch._C._dispatch_has_kernel_for_dispatch_key(op_name, dkey):
                    return
        except RuntimeError:  # the op's library was left out
            return
        torch.library.register_fake(op_name, fn)"""
assert old in s
open(p, "w").write(s.replace(old, new))
p = f"{site}/fbgemm_gpu/__init__.py"
s = open(p).read()
assert '"1.5": "2.10",' in s
s = s.replace('"1.5": "2.10",', '"1.6": "2.11",\n    "1.5": "2.10",')
for lib in ("fbgemm_gpu_tbe_inference", "fbgemm_gpu_tbe_training_backward_gwd", "fbgemm_gpu_tbe_training_backward_vbe"):
    assert f'    "{lib}",\n' in s
    s = s.replace(f'    "{lib}",\n', "")
open(p, "w").write(s)
print("fbgemm_gpu patched")
