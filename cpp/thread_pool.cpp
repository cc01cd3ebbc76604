// The persistent pool (see thread_pool.h).
#include "thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>

#if defined(__linux__)
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

std::atomic<long> g_sleeps{0};            // waits that went to sleep (for tests)
std::atomic<bool> g_never_spin{false};    // tests: every wait sleeps at once
std::atomic<bool> g_fit_to_cores{true};   // tests: false runs every job on all its threads

// ---------------------------------------------------------------------------
// Waiting: a short spin, then sleep until the word changes.
//
// Threads wait at the barrier of every time step, for the end of a job and for
// the next job. Spinning is right when every thread of the job has a core: a
// step takes microseconds and a sleep and wake-up costs tens of them. It is
// wrong when one of them has none (torch's OpenMP workers spinning after their
// own region, another process, more runnable threads than cores): the waiting
// threads then hold the cores the missing one needs. The earlier spin-then-yield
// kept the core busy; sched_yield does not move the missing thread over, so a
// step waited for a whole time slice of the other program (T=100 N=1 H=128
// inference measured 0.5 ms to 50 ms from run to run on a loaded 2-core machine).
// Sleeping frees the core, and the scheduler moves the missing thread to it.

// A word that threads sleep on until it changes: a futex on Linux, a mutex and a
// condition variable elsewhere. Whoever changes it wakes the sleepers, with a
// system call only when there are any.
class WaitWord {
 public:
  unsigned load() const { return word_.load(std::memory_order_acquire); }

  void store(unsigned value) {
    word_.store(value, std::memory_order_seq_cst);
    wake();
  }

  int sleepers() const { return sleepers_.load(std::memory_order_relaxed); }

  void add(unsigned delta) {
    word_.fetch_add(delta, std::memory_order_seq_cst);
    wake();
  }

  // Sleeps while the word is `seen` (may return early: callers check again).
  // A sleeper is counted before the word is read again, and a waker reads the
  // count after changing the word (both sequentially consistent), so either the
  // sleeper sees the change or the waker sees the sleeper.
  void sleep(unsigned seen) {
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    if (word_.load(std::memory_order_seq_cst) == seen) {
      g_sleeps.fetch_add(1, std::memory_order_relaxed);
#if defined(__linux__)
      syscall(SYS_futex, reinterpret_cast<unsigned*>(&word_), FUTEX_WAIT_PRIVATE, seen, nullptr,
              nullptr, 0);
#else
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [&] { return word_.load(std::memory_order_seq_cst) != seen; });
#endif
    }
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }

 private:
  void wake() {
    if (sleepers_.load(std::memory_order_seq_cst) == 0) return;
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<unsigned*>(&word_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
            nullptr, 0);
#else
    { std::lock_guard<std::mutex> lock(mutex_); }  // a sleeper is in wait() or sees the change
    changed_.notify_all();
#endif
  }

#if defined(__linux__)
  static_assert(sizeof(std::atomic<unsigned>) == sizeof(unsigned) &&
                    std::atomic<unsigned>::is_always_lock_free,
                "the futex is the atomic's own storage");
#else
  std::mutex mutex_;
  std::condition_variable changed_;
#endif
  std::atomic<unsigned> word_{0};
  std::atomic<int> sleepers_{0};
};

// How long a thread spins before it sleeps, learned per thread and per kind of
// wait from the waits it has seen. A sleep and its wake-up cost about 5 us
// (a futex ping-pong between two threads: 9-11 us a round trip on a 2-core VM,
// loaded or not); spinning that long first is never more than twice the best
// choice, so that is the floor. Waits up to `ceiling` are worth spinning
// through when they are the rule: `typical` follows their length, and the spin
// covers four times that. Waits beyond the ceiling (a thread without a core, a
// long gap between jobs) are not; their share `late` takes the spin down to the
// floor, so on an oversubscribed machine a thread soon sleeps instead of
// holding a core.
class Spin {
 public:
  Spin(double floor_ns, double ceiling_ns) : floor_(floor_ns), ceiling_(ceiling_ns) {}

  Clock::duration limit() const {
    if (g_never_spin.load(std::memory_order_relaxed)) return Clock::duration::zero();
    const double spin = std::max(floor_, std::min(ceiling_, 4 * typical_ + floor_) * (1 - late_));
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::nano>(spin));
  }

  void record(Clock::duration waited) {
    const double ns = std::chrono::duration<double, std::nano>(waited).count();
    const bool long_wait = ns > ceiling_;
    late_ += ((long_wait ? 1.0 : 0.0) - late_) * kRate;
    if (!long_wait) typical_ += (ns - typical_) * kRate;
  }

 private:
  static constexpr double kRate = 1.0 / 16;  // about the last 16 waits
  double floor_, ceiling_;
  double typical_ = 0, late_ = 0;
};

// Waits until done(word) holds: spins up to spin.limit(), then sleeps.
template <typename Done>
void wait_for(WaitWord& word, Done&& done, Spin& spin) {
  unsigned seen = word.load();
  if (done(seen)) return;
  const Clock::time_point start = Clock::now(), until = start + spin.limit();
  for (unsigned i = 1;; ++i) {
    LSTMFAST_PAUSE();
    seen = word.load();
    if (done(seen)) {
      spin.record(Clock::now() - start);
      return;
    }
    if ((i & 15) == 0 && Clock::now() >= until) break;
  }
  while (!done(seen)) {
    word.sleep(seen);
    seen = word.load();
  }
  spin.record(Clock::now() - start);
}

// Barrier waits: a step takes from about 4 us (LSTM T=100 N=1 I=H=128 inference
// on 2 threads, 0.36 ms a call at best) to about 160 us (N=8 I=H=256: 16 ms), and
// when both threads have a core they arrive within a few us of one another; a
// wait of more than 50 us means a thread without a core.
Spin& barrier_spin() {
  thread_local Spin spin(10e3, 50e3);
  return spin;
}

// Waits for the next job: those of one call follow one another within
// microseconds; those of a torch model come after its other layers' work.
Spin& idle_spin() {
  thread_local Spin spin(10e3, 200e3);
  return spin;
}

// ---------------------------------------------------------------------------
// Cores free for a job.
//
// A job's threads meet at a barrier every step, so a step lasts as long as its
// slowest thread takes to get a core. When the machine has more runnable threads
// than cores, a job of 2 threads ran slower than the same job on the caller alone
// at every shape measured (2 cores, 3 other busy processes, LSTM T=100 inference:
// N=1 H=128 8.0 against 0.9 ms, N=8 H=256 37 against 38 ms; training: 48 against
// 6 ms, 103 against 91 ms). So a job takes no more threads than there are cores
// left by the threads of others that are running.

// Threads running or waiting for a core in the whole system now (the fourth field
// of /proc/loadavg, "running/total"), the caller included; -1 when unknown.
int runnable_now() {
#if defined(__linux__)
  static const int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  char text[128];
  const ssize_t n = pread(fd, text, sizeof(text) - 1, 0);
  if (n <= 0) return -1;
  text[n] = '\0';
  const char* p = text;
  for (int field = 0; field < 3; ++field) {  // skip the three load averages
    while (*p && *p != ' ') ++p;
    while (*p == ' ') ++p;
  }
  char* end = nullptr;
  const long running = std::strtol(p, &end, 10);
  return end != p && *end == '/' && running > 0 ? static_cast<int>(running) : -1;
#else
  return -1;
#endif
}

int online_cpus() {
#if defined(__linux__)
  static const int cpus = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  return cpus > 0 ? cpus : 1;
#else
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
#endif
}

// The count is read at most once a millisecond (a read costs about 4 us; the
// shortest jobs, N=1 H=128 forward, take about 300 us) and is one sample of a
// quantity that changes all the time, which is good enough to tell a machine
// with free cores from one without.
constexpr auto kRunnableEvery = std::chrono::milliseconds(1);

// Threads of the pool a job may use: `wanted`, or fewer when `ours` of the runnable
// threads (the caller and the pool's awake workers) leave fewer cores free.
int usable_threads(int wanted, int ours) {
  static std::atomic<Clock::rep> read_at{0};
  static std::atomic<int> others{0};
  const Clock::rep now = Clock::now().time_since_epoch().count();
  Clock::rep last = read_at.load(std::memory_order_relaxed);
  if (now - last > std::chrono::duration_cast<Clock::duration>(kRunnableEvery).count() &&
      read_at.compare_exchange_strong(last, now)) {
    const int running = runnable_now();
    others.store(running < 0 ? 0 : std::max(0, running - ours), std::memory_order_relaxed);
  }
  const int free = online_cpus() - others.load(std::memory_order_relaxed);
  return std::max(1, std::min(wanted, free));
}

struct Job {
  PoolTask task = nullptr;
  void* ctx = nullptr;
  int threads = 1;
  bool fit_to_cores = true;     // false: all its threads even without free cores (tests)
  std::atomic<int> arrived{0};  // barrier: threads that reached the current one
  WaitWord phase;               // barrier: completed barriers
  std::exception_ptr error;
  std::mutex error_mutex;

  void barrier() {
    if (threads <= 1) return;
    const unsigned p = phase.load();
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(p + 1);
      return;
    }
    wait_for(phase, [p](unsigned now) { return now != p; }, barrier_spin());
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
  // Runs the job on its threads (fewer when the machine has no free core for
// them); false (nothing run) when another caller holds the pool or when one
// thread is all it gets.
  bool run(Job& job) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    if (job.fit_to_cores && g_fit_to_cores.load(std::memory_order_relaxed)) job.threads = usable_threads(job.threads, 1 + awake_workers());
    if (job.threads <= 1) return false;
    if (!grow(job.threads - 1)) return false;
    finished_.store(0);  // the workers of the last job have all counted themselves
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      job_threads_ = job.threads;
    }
    generation_.add(1);
    job.run(0);
    const unsigned workers = static_cast<unsigned>(job.threads - 1);
    wait_for(finished_, [workers](unsigned n) { return n == workers; }, barrier_spin());
    return true;
  }

  // Workers not asleep between jobs (spinning for the next, or working): running
  // threads of ours, not of others.
  int awake_workers() const {
    return std::max(0, static_cast<int>(workers_) - generation_.sleepers());
  }

 private:
  // Starts workers until there are `workers`; false when the system refuses a
  // thread. A worker is counted only once it exists, so a job never waits for one
  // that was never started (the caller then runs the job on its own thread).
  bool grow(int workers) {
    while (static_cast<int>(workers_) < workers) {
      const int tid = static_cast<int>(workers_) + 1;
      const unsigned seen = generation_.load();  // before the next job
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
      wait_for(generation_, [&seen](unsigned now) { return now != seen; }, idle_spin());
      Job* job;
      {
        // The job and its generation are read together under the lock; a job this
        // worker has no part in may be over (and gone) already, so only its
        // thread count, kept here, is read before deciding.
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load();
        job = tid < job_threads_ ? job_ : nullptr;
      }
      if (!job) continue;
      t_job = job;
      job->run(tid);
      t_job = nullptr;
      finished_.add(1);  // the pool's word, not the job's: the job may be gone right after
    }
  }

  std::mutex busy_;   // held by the caller whose job runs
  std::mutex mutex_;  // guards job_ and job_threads_
  WaitWord generation_;  // jobs started
  WaitWord finished_;    // workers (tid >= 1) done with the current job
  Job* job_ = nullptr;
  int job_threads_ = 0;
  std::atomic<unsigned> workers_{0};
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

namespace {

void run_job(int threads, PoolTask task, void* ctx, bool fit_to_cores) {
  Job job;
  job.task = task;
  job.ctx = ctx;
  job.fit_to_cores = fit_to_cores;
  job.threads = threads > 1 && t_job == nullptr ? threads : 1;
  Job* outer = t_job;
  t_job = &job;
  if (job.threads > 1 && !pool().run(job)) job.threads = 1;
  if (job.threads == 1) job.run(0);
  t_job = outer;
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace

void pool_run(int threads, PoolTask task, void* ctx) { run_job(threads, task, ctx, true); }

int pool_threads() { return t_job ? t_job->threads : 1; }

void pool_barrier() {
  if (t_job) t_job->barrier();
}

int pool_usable_threads(int wanted) {
  return wanted <= 1 ? 1 : usable_threads(wanted, 1 + pool().awake_workers());
}

void pool_set_never_spin(bool never) { g_never_spin.store(never); }

void pool_set_fit_to_cores(bool fit) { g_fit_to_cores.store(fit); }

long pool_sleeps() { return g_sleeps.load(); }

long pool_check_barriers(int threads, int steps, int* ran) {
  struct Check {
    std::atomic<int> reached[64];  // the last step each thread has reached
    std::atomic<long> violations{0};
    std::atomic<int> ran{1};
    int steps = 0;
  } check;
  if (threads > 64) threads = 64;
  for (auto& r : check.reached) r.store(-1);
  check.steps = steps;
  run_job(threads, [](void* ctx, int tid) {
    Check& c = *static_cast<Check*>(ctx);
    const int nt = pool_threads();
    if (tid == 0) c.ran.store(nt);
    for (int k = 0; k < c.steps; ++k) {
      c.reached[tid].store(k);
      pool_barrier();
      // Every thread has reached step k, and none is past k + 1: passing the
      // next barrier needs this thread too.
      for (int other = 0; other < nt; ++other) {
        const int r = c.reached[other].load();
        if (r != k && r != k + 1) c.violations.fetch_add(1);
      }
    }
  }, &check, false);
  *ran = check.ran.load();
  return check.violations.load();
}

}  // namespace lstmfast
