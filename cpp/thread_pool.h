// One persistent pool of worker threads per process, for the per-step work of
// the recurrence (and the GEMMs around it, cut into one slice per thread).
//
// A job runs fn(ctx, tid) on threads tid = 0..n-1, the caller being thread 0, and
// returns when all are done. Inside a job the threads meet at pool_barrier()
// once per time step. Every wait (at a barrier, for the end of a job, for the
// next job) spins for a short time learned from the recent waits, then sleeps
// (a futex on Linux), so waiting threads do not keep cores from a thread of the
// job that has none, nor from other libraries. Every worker flushes denormals
// while it works.
//
// The interface is plain functions and pointers: the per-ISA kernel units call
// it, and must not share inline std:: code with units built for another ISA.
#pragma once

namespace lstmfast {

using PoolTask = void (*)(void* ctx, int tid);

// Runs task(ctx, tid) for tid in 0..threads-1 and waits for all (thread 0 is the
// caller). It takes fewer threads when the machine's other running threads leave
// fewer cores free; when that leaves one, when threads <= 1, or when the pool is
// busy with another caller's job, it runs everything on the caller. The task
// must cope with any count: it gets the one it runs with from pool_threads().
// Rethrows the first exception.
void pool_run(int threads, PoolTask task, void* ctx);

// The threads pool_run(wanted, ...) would take now: fewer than wanted when the
// machine's other running threads leave fewer cores free, never less than 1.
int pool_usable_threads(int wanted);

// Threads of the job the calling thread belongs to (1 outside any job).
int pool_threads();

// Waits until every thread of the current job has reached it (a no-op with one thread).
void pool_barrier();

// For tests: when `never` is set, every wait sleeps at once instead of spinning.
void pool_set_never_spin(bool never);

// For tests: when `fit` is false, every job runs on all the threads it asks for
// (unless the pool is busy), however few cores the machine has free.
void pool_set_fit_to_cores(bool fit);

// For tests: the waits that have gone to sleep so far, in the whole process.
long pool_sleeps();

// For tests: one job of `steps` barriers on `threads` threads (however busy the
// machine, unless the pool is busy), each thread checking
// after every barrier that all the others have reached it. Returns the number of
// violations; *ran gets the thread count the job ran with.
long pool_check_barriers(int threads, int steps, int* ran);

}  // namespace lstmfast
