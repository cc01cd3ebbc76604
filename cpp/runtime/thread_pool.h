// One persistent pool of worker threads per process, for the per-step work of
// the recurrence (and the GEMMs around it, cut into one slice per thread).
//
// A job runs fn(ctx, tid) on threads tid = 0..n-1, the caller being thread 0, and
// returns when all are done. Where the process has loaded an OpenMP runtime with
// the GNU ABI (torch's), the job is a parallel region of it instead, on the threads
// torch's own ops use, and its barriers are the runtime's (thread_pool.cpp). Inside a job the threads meet at pool_barrier()
// once per time step. Every wait (at a barrier, for the end of a job, for the
// next job) spins for a short time learned from the recent waits, then sleeps
// (a futex on Linux), so waiting threads do not keep cores from a thread of the
// job that has none, nor from other libraries. Every worker flushes denormals
// while it works.
//
// The interface is plain functions and pointers: the per-ISA kernel units call
// it, and must not share inline std:: code with units built for another ISA.
#pragma once

#include <sched.h>

namespace lstmfast {

using PoolTask = void (*)(void* ctx, int tid);

// Runs task(ctx, tid) for tid in 0..threads-1 and waits for all (thread 0 is the
// caller). It takes fewer threads when the machine's other running threads leave
// fewer cores free; when that leaves one, when threads <= 1, or when the pool is
// busy with another caller's job, it runs everything on the caller. The task
// must cope with any count: it gets the one it runs with from pool_threads().
// Rethrows the first exception.
void pool_run(int threads, PoolTask task, void* ctx);

// A call that will run jobs of `threads` threads is starting: wakes the workers
// that sleep between jobs now, so that their wake-up overlaps the call's serial
// work (a no-op when they are awake, inside a job, or when the job is bound for an
// OpenMP team or, the cores being busy, for the caller alone: those workers would
// take cores from the threads that need them).
void pool_prepare(int threads);

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

// For tests: the pool counts `threads` other runnable threads on the machine, as if
// it had read them, when deciding how many cores a job may take (-1: it reads them).
void pool_set_others_running(int threads);
// For tests: what the pool reads as the machine's running threads, theirs and ours,
// in place of /proc/loadavg (-1: it reads that); the reads still come at most once a
// millisecond and go through the pool's filter, as real ones.
void pool_set_runnable_reading(int threads);

// For tests: where the process has loaded an OpenMP runtime (torch's), jobs run as
// its parallel regions never (0), when the cores are busy (1, the default: see
// thread_pool.cpp) or always (2).
void pool_set_use_openmp(int use);
// Whether jobs run on a loaded OpenMP runtime's team now.
bool pool_openmp_found();

// For tests: the waits that have gone to sleep so far, in the whole process.
long pool_sleeps();

// What the pool did since counting was last switched on (pool_set_counting), for
// diagnosis and tests. Waits: {count, of which slept, total nanoseconds}.
struct PoolCounts {
  long jobs = 0;                // jobs run on the pool's threads
  long jobs_fewer_threads = 0;  // of the jobs asking for several threads, those given fewer (cores busy)
  long same_cpu = 0;            // barrier checks that found two threads of a job on one CPU
  long moves = 0;               // workers moved off a CPU they shared with the caller
  long prewakes = 0;            // pool_prepare calls that woke sleeping workers
  long jobs_openmp = 0;         // jobs run as parallel regions of the process's OpenMP runtime
  long jobs_alone = 0;          // jobs asking for several threads that ran on the caller alone
  long barrier[3] = {0, 0, 0};  // waits at a job's barriers
  long idle[3] = {0, 0, 0};     // workers' waits for the next job
  long finish[3] = {0, 0, 0};   // the caller's waits for its workers at the end of a job
};
// Counting costs a few atomic adds per wait; switching it on zeroes the counts.
void pool_set_counting(bool on);
PoolCounts pool_counts();

// For tests: one job of `steps` barriers on `threads` threads (however busy the
// machine, unless the pool is busy), each thread checking
// after every barrier that all the others have reached it; the last thread is busy
// for late_ns before each barrier. Returns the number of violations; *ran gets the
// thread count the job ran with.
long pool_check_barriers(int threads, int steps, int* ran, long late_ns = 0);

// For tests: the waiting policy. A wait inside a job spins job_ns before it
// sleeps; a worker's wait for the next job spins as learned from its past waits
// (between idle_floor_ns and idle_ceiling_ns). idle_limits_ns[i] gets the idle
// spin limit a fresh worker has after the waits idle_waits_ns[0..i].
struct SpinLimits {
  long job_ns = 0, idle_floor_ns = 0, idle_ceiling_ns = 0;
};
SpinLimits pool_spin_limits(const long* idle_waits_ns, int count, long* idle_limits_ns);

// What a thread waiting inside a job does when another thread of the job shares
// its CPU (see thread_pool.cpp).
enum class Colocated { kSpin, kMove, kYield };

// Workers asleep between jobs now.
int pool_sleeping_workers();
// What waking a sleeping worker has cost lately, in nanoseconds (0 before any was
// woken): the time from the signal to the worker starting.
double pool_wake_cost_ns();
// For tests: fixes what pool_wake_cost_ns() reports at ns, which wake-ups then leave
// as it is (a test's own call wakes the workers, and would teach the pool another
// cost before the call decided on it); a negative ns lets them learn it again, from 0.
void pool_set_wake_cost_ns(double ns);
// For tests: the caller pauses this long while it publishes a job to the workers,
// which widens the window in which a worker woken before may look for work.
void pool_set_publish_delay_ns(long ns);
// For tests: how long the workers a call's start woke (pool_prepare) spin for its
// job before they sleep again (-1: the default, 2 ms).
void pool_set_prewake_spin_ns(long ns);

// For tests: colocation's decision (thread_pool.cpp) for thread tid waiting on CPU
// my_cpu, cpus[t] the CPU thread t of the job was last seen on, with the CPUs the
// process may use.
Colocated colocation_action(int tid, int my_cpu, const int* cpus, int threads,
                            const cpu_set_t* allowed);

}  // namespace lstmfast
