"""Ray's own costs on this machine: local cluster start/stop, a warm no-op task's round trip, importing
sublab's pipeline in a fresh worker (docs/scale.md). Run: python bench/ray_overhead.py"""
import time, os, sys
t=time.time()
import ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, object_store_memory=128<<20)
print(f"init {time.time()-t:.1f} s")
@ray.remote(num_cpus=1)
def noop(): return os.getpid()
@ray.remote(num_cpus=1)
def imp():
    t=time.time(); import sublab.pipeline, sublab.train; return time.time()-t
ray.get([noop.remote() for _ in range(2)])
t=time.time(); n=50
for _ in range(n): ray.get(noop.remote())
print(f"warm no-op task round trip {(time.time()-t)/n*1000:.0f} ms")
print("import sublab.pipeline in a fresh worker", [round(x,1) for x in ray.get([imp.remote() for _ in range(2)])], "s")
t=time.time(); ray.shutdown(); print(f"shutdown {time.time()-t:.1f} s")
