// One persistent pool of worker threads per process, for the per-step work of
// the recurrence (and the GEMMs around it, cut into one slice per thread).
//
// A job runs fn(ctx, tid) on threads tid = 0..n-1, the caller being thread 0, and
// returns when all are done. Inside a job the threads meet at pool_barrier()
// once per time step. Between jobs the workers spin briefly (jobs of one call
// follow each other within microseconds), then sleep, so idle workers do not keep
// cores from other libraries. Every worker flushes denormals while it works.
//
// The interface is plain functions and pointers: the per-ISA kernel units call
// it, and must not share inline std:: code with units built for another ISA.
#pragma once

namespace lstmfast {

using PoolTask = void (*)(void* ctx, int tid);

// Runs task(ctx, tid) for tid in 0..threads-1 and waits for all (thread 0 is the
// caller). When threads <= 1, or the pool is busy with another caller's job, it
// runs everything on the caller: threads is then 1 and the task must cope (it
// gets the count it runs with from pool_threads()). Rethrows the first exception.
void pool_run(int threads, PoolTask task, void* ctx);

// Threads of the job the calling thread belongs to (1 outside any job).
int pool_threads();

// Waits until every thread of the current job has reached it (a no-op with one thread).
void pool_barrier();

}  // namespace lstmfast
