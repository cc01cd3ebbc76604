// The persistent pool (see thread_pool.h).
#include "thread_pool.h"

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "denormals.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LSTMFAST_PAUSE() _mm_pause()
#else
#define LSTMFAST_PAUSE() std::this_thread::yield()
#endif

namespace lstmfast {
namespace {

using Clock = std::chrono::steady_clock;

// How long an idle worker spins for the next job before it sleeps, and how long
// a thread spins at a barrier before it starts yielding its core (the other
// threads may have been preempted on a busy machine).
constexpr auto kIdleSpin = std::chrono::microseconds(200);
constexpr auto kBarrierSpin = std::chrono::microseconds(500);

// Spins until done() holds: pause for `spin`, then yield between checks.
template <typename F>
void spin_until(F&& done, Clock::duration spin) {
  if (done()) return;
  const Clock::time_point until = Clock::now() + spin;
  for (unsigned i = 1;; ++i) {
    if (done()) return;
    if ((i & 63) == 0 && Clock::now() > until) break;
    LSTMFAST_PAUSE();
  }
  while (!done()) std::this_thread::yield();
}

struct Job {
  PoolTask task = nullptr;
  void* ctx = nullptr;
  int threads = 1;
  std::atomic<int> arrived{0};      // barrier: threads that reached the current one
  std::atomic<unsigned> phase{0};   // barrier: completed barriers
  std::atomic<int> finished{0};     // workers (tid >= 1) done with the task
  std::exception_ptr error;
  std::mutex error_mutex;

  void barrier() {
    if (threads <= 1) return;
    const unsigned p = phase.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(p + 1, std::memory_order_release);
      return;
    }
    spin_until([&] { return phase.load(std::memory_order_acquire) != p; }, kBarrierSpin);
  }

  void run(int tid) {
    try {
      task(ctx, tid);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  }
};

thread_local Job* t_job = nullptr;  // the job this thread is working on

class Pool {
 public:
  // Runs the job on `threads` threads; false (nothing run) when another caller holds the pool.
  bool run(Job& job) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    if (!grow(job.threads - 1)) return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      job_threads_ = job.threads;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    job.run(0);
    spin_until([&] { return job.finished.load(std::memory_order_acquire) == job.threads - 1; },
               kBarrierSpin);
    return true;
  }

 private:
  // Starts workers until there are `workers`; false when the system refuses a
  // thread. A worker is counted only once it exists, so a job never waits for one
  // that was never started (the caller then runs the job on its own thread).
  bool grow(int workers) {
    while (static_cast<int>(workers_) < workers) {
      const int tid = static_cast<int>(workers_) + 1;
      const unsigned seen = generation_.load(std::memory_order_acquire);  // before the next job
      try {
        std::thread([this, tid, seen] { work(tid, seen); }).detach();
      } catch (const std::system_error&) {
        return false;
      }
      ++workers_;
    }
    return true;
  }

  void work(int tid, unsigned seen) {
    ScopedFlushDenormals flush;
    for (;;) {
      auto fresh = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      spin_until_or_sleep(fresh);
      Job* job;
      {
        // The job and its generation are set together under the lock; a job this
        // worker has no part in may be over (and gone) already, so only its
        // thread count, kept here, is read before deciding.
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_acquire);
        job = tid < job_threads_ ? job_ : nullptr;
      }
      if (!job) continue;
      t_job = job;
      job->run(tid);
      t_job = nullptr;
      job->finished.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  template <typename F>
  void spin_until_or_sleep(F&& fresh) {
    const Clock::time_point until = Clock::now() + kIdleSpin;
    for (unsigned i = 1; !fresh(); ++i) {
      if ((i & 63) == 0 && Clock::now() > until) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, fresh);
        return;
      }
      LSTMFAST_PAUSE();
    }
  }

  std::mutex busy_;   // held by the caller whose job runs
  std::mutex mutex_;  // guards job_ and the sleep
  std::condition_variable wake_;
  std::atomic<unsigned> generation_{0};  // jobs started
  Job* job_ = nullptr;
  int job_threads_ = 0;
  unsigned workers_ = 0;
};

// Never destroyed: detached workers may still sleep in it at exit. A forked
// child has none of the parent's workers, so it starts a pool of its own.
Pool* g_pool = nullptr;
std::once_flag g_pool_once;

Pool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new Pool;
    pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool; });
  });
  return *g_pool;
}

}  // namespace

void pool_run(int threads, PoolTask task, void* ctx) {
  Job job;
  job.task = task;
  job.ctx = ctx;
  job.threads = threads > 1 && t_job == nullptr ? threads : 1;
  Job* outer = t_job;
  t_job = &job;
  if (job.threads > 1 && !pool().run(job)) job.threads = 1;
  if (job.threads == 1) job.run(0);
  t_job = outer;
  if (job.error) std::rethrow_exception(job.error);
}

int pool_threads() { return t_job ? t_job->threads : 1; }

void pool_barrier() {
  if (t_job) t_job->barrier();
}

}  // namespace lstmfast
