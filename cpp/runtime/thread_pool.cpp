// The persistent pool (see thread_pool.h). One file, although long: the waiting
// policy, the pool, the OpenMP bridge and their test hooks share private state, and
// their comments carry the measurements that chose each rule.
#include "runtime/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>

#if defined(__linux__)
#include <dlfcn.h>
#include <fcntl.h>
#include <link.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "runtime/denormals.h"

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
std::atomic<long> g_publish_delay_ns{0};  // tests: a pause while a job is being published
std::atomic<long> g_prewake_spin_ns{-1};  // tests: how long prepare()'s workers spin (-1: kJobSpin)
std::atomic<bool> g_wake_cost_fixed{false};  // tests: wake-ups leave the learned wake cost alone
std::atomic<bool> g_fit_to_cores{true};   // tests: false runs every job on all its threads
std::atomic<int> g_others_running{-1};    // tests: other runnable threads, as if read (-1: read them)
std::atomic<int> g_runnable_reading{-1};  // tests: what /proc/loadavg says runs (-1: read it)

// What the pool did, counted while g_counting is on (pool_set_counting): for
// diagnosis and for tests of its decisions. Off, a wait reads one relaxed flag.
std::atomic<bool> g_counting{false};
struct WaitCounters {
  std::atomic<long> waits{0}, sleeps{0}, nanoseconds{0};
  void count(bool slept, Clock::duration waited) {
    waits.fetch_add(1, std::memory_order_relaxed);
    if (slept) sleeps.fetch_add(1, std::memory_order_relaxed);
    nanoseconds.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(waited).count(),
                          std::memory_order_relaxed);
  }
  void reset() { waits = sleeps = nanoseconds = 0; }
};
WaitCounters g_barrier_waits;  // at a job's barriers
WaitCounters g_idle_waits;     // workers waiting for the next job
WaitCounters g_finish_waits;   // the caller waiting for its workers at the end of a job
std::atomic<long> g_jobs{0};            // jobs run on the pool
std::atomic<long> g_jobs_fewer{0};      // of those, on fewer threads than asked (fit to cores)
std::atomic<long> g_jobs_alone{0};      // jobs asking for threads that ran on the caller alone
std::atomic<long> g_same_cpu{0};        // barrier checks that found two threads of a job on one CPU
std::atomic<long> g_moves{0};           // workers moved off a CPU they shared with another of the job
std::atomic<long> g_prewakes{0};        // calls that woke sleeping workers early (pool_prepare)
std::atomic<long> g_jobs_openmp{0};     // jobs run as a parallel region of the process's OpenMP runtime
std::atomic<int> g_use_openmp{1};       // 0 never, 1 when the cores are busy (run_job), 2 always (tests)

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

// Between jobs: how long a worker spins for the next job before it sleeps,
// learned from the waits it has seen. A sleep and its wake-up cost about 5 us on
// bare metal; spinning that long first is never more than twice the best choice,
// so that is the floor. Waits up to `ceiling` are worth spinning through when they
// are the rule (the jobs of one call follow one another within microseconds):
// `typical` follows their length, and the spin covers four times that. Waits
// beyond the ceiling (a gap between calls, a model's other layers) are not; their
// share `late` takes the spin down to the floor, so an idle worker soon sleeps
// instead of holding a core. A call wakes the sleeping workers early, as it
// starts (pool_prepare), so the wake-up overlaps its serial work.
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

constexpr double kIdleSpinFloor = 10e3, kIdleSpinCeiling = 200e3;  // ns
Spin& idle_spin() {
  thread_local Spin spin(kIdleSpinFloor, kIdleSpinCeiling);
  return spin;
}

// Inside a job (its barriers, and the caller's wait for its workers at the end) a
// thread spins up to this long before it sleeps, whatever waits it has seen.
// There a wait is short whenever every thread of the job has a core (a few us
// between threads of one step); a long one means a thread without a core, or a
// worker the job woke from sleep. Sleeping is the wrong answer to both on a VM:
// a futex wake-up of a thread whose virtual CPU has halted took 100 us to 1.5 ms
// (2-core KVM guest), longer than any step, so once one thread slept the other
// waited past its spin at the next barrier and slept too, and every step of the
// call paid a wake-up (LSTM T=100 N=8 H=256, 2 threads, calls 100 ms apart: 96
// of 100 barriers slept, 12.3 ms a call against 5.3 back to back). And Linux
// wakes a thread onto its waker's CPU when the sleeper's virtual CPU looks
// preempted, which put both threads of a job on one CPU for the rest of the call
// (half the barriers of such calls). A thread without a core stays possible
// (fit_to_cores keeps jobs to the free cores when they start); the spin bounds
// what it costs.
constexpr auto kJobSpin = std::chrono::milliseconds(2);

// The CPU the calling thread runs on (-1 where unknown).
int current_cpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

// Waits until done(word) holds: spins up to `limit`, then sleeps. Every 16 spins
// `check()` may act (and returns whether the spin should end at once).
struct Waited {
  Clock::duration time{};
  bool slept = false;
};
template <typename Done, typename Check>
Waited wait_for(WaitWord& word, Done&& done, Clock::duration limit, WaitCounters& counters,
                Check&& check) {
  unsigned seen = word.load();
  if (done(seen)) return {};
  const Clock::time_point start = Clock::now(), until = start + limit;
  bool slept = false;
  for (unsigned i = 1;; ++i) {
    LSTMFAST_PAUSE();
    seen = word.load();
    if (done(seen)) break;
    if ((i & 15) == 0 && (Clock::now() >= until || check())) {
      while (!done(seen)) {
        word.sleep(seen);
        seen = word.load();
      }
      slept = true;
      break;
    }
  }
  const Clock::duration waited = Clock::now() - start;
  if (g_counting.load(std::memory_order_relaxed)) counters.count(slept, waited);
  return {waited, slept};
}

// The learned wait between jobs; returns whether the worker slept.
// `at_least` spins past the learned limit (a worker that prepare() woke), until
// `cut()` says that is no longer wanted: then the worker sleeps at once.
template <typename Done, typename Cut>
bool wait_idle(WaitWord& word, Done&& done, Clock::duration at_least, Cut&& cut) {
  Spin& spin = idle_spin();
  const Clock::duration limit = std::max(spin.limit(), at_least);
  const Waited w = wait_for(word, done,
                            g_never_spin.load(std::memory_order_relaxed) ? Clock::duration::zero() : limit,
                            g_idle_waits, cut);
  spin.record(w.time);
  return w.slept;
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
  const int reading = g_runnable_reading.load(std::memory_order_relaxed);
  if (reading >= 0) return reading;
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
// Others seen in one read are believed only when the read before, at most this long
// ago, saw them too (unless an OpenMP runtime is loaded: see usable_threads). While a
// job's threads hold every core, a thread that wakes for a moment (a kernel worker, a
// daemon) waits for one and is counted: on 2 cores, 1 call in 8 of LSTM T=100 N=8
// H=256 inference (runs of 12 calls after half-second pauses) read a third thread
// ("running 3", ours 2) and ran alone, in 8.2 ms instead of 4.2; 2 in 96 with two
// reads. Other processes that keep the cores busy are seen by consecutive reads: a
// machine that turns busy is believed one read later.
constexpr auto kConfirmWithin = std::chrono::milliseconds(100);

struct OpenMP;
const OpenMP* openmp();  // the loaded OpenMP runtime, or null (below)

// Threads of the pool a job may use: `wanted`, or fewer when `ours` of the runnable
// threads (the caller and the pool's awake workers) leave fewer cores free.
int usable_threads(int wanted, int ours) {
  static std::atomic<Clock::rep> read_at{0};
  static std::atomic<int> others{0};       // what jobs go by: seen by this read and the last
  static std::atomic<int> last_seen{0};    // what the last read alone saw
  const Clock::rep now = Clock::now().time_since_epoch().count();
  Clock::rep last = read_at.load(std::memory_order_relaxed);
  if (now - last > std::chrono::duration_cast<Clock::duration>(kRunnableEvery).count() &&
      read_at.compare_exchange_strong(last, now)) {
    const int running = runnable_now();
    const int seen = running < 0 ? 0 : std::max(0, running - ours);
    // With an OpenMP runtime loaded, others are most likely its team, spinning after
    // torch's last op and asleep a few milliseconds later, and each read is believed:
    // confirmed, the reads that caught the team lost their say (cell_loop inference, 100
    // steps of LSTMCell(256) at N=1 between torch's ops, 2 threads: 4.1 -> 5.6 ms).
    const bool confirm =
        now - last <= std::chrono::duration_cast<Clock::duration>(kConfirmWithin).count() &&
        openmp() == nullptr;
    others.store(confirm ? std::min(seen, last_seen.load(std::memory_order_relaxed)) : seen,
                 std::memory_order_relaxed);
    last_seen.store(seen, std::memory_order_relaxed);
  }
  const int forced = g_others_running.load(std::memory_order_relaxed);
  const int free = online_cpus() - (forced >= 0 ? forced : others.load(std::memory_order_relaxed));
  return std::max(1, std::min(wanted, free));
}

// What thread tid of a job, waiting on CPU my_cpu, does when cpus[0..threads) (the
// CPU each thread of the job was last seen on) shows another thread there: a
// worker moves to the job's other allowed CPUs (kMove; its own threads are the
// pool's business), the caller, whose CPU is the user's, lets the other run
// (kYield); kSpin when the CPU is its own (or unknown).
Colocated colocation_decision(int tid, int my_cpu, const int* cpus, int threads,
                              const cpu_set_t* allowed) {
  if (my_cpu < 0) return Colocated::kSpin;
  bool shared = false;
  for (int t = 0; t < threads && !shared; ++t) shared = t != tid && cpus[t] == my_cpu;
  if (!shared) return Colocated::kSpin;
  if (g_counting.load(std::memory_order_relaxed)) g_same_cpu.fetch_add(1);
  if (tid > 0 && allowed && CPU_ISSET(my_cpu, allowed) && CPU_COUNT(allowed) >= 2)
    return Colocated::kMove;
  return Colocated::kYield;
}

// The entry points of a loaded OpenMP runtime (see openmp() below).
struct OpenMP {
  void (*parallel)(void (*fn)(void*), void* data, unsigned threads, unsigned flags);
  void (*barrier)();
  int (*thread_num)();
  int (*num_threads)();
};

struct Job;
thread_local Job* t_job = nullptr;  // the job this thread is working on
thread_local int t_tid = 0;         // its thread number in that job

// Moves the calling worker off `cpu` for the rest of its job (to the other CPUs
// `allowed` has); true when it did. The worker gets all of `allowed` back after.
bool leave_cpu(int cpu, const cpu_set_t& allowed) {
#if defined(__linux__)
  if (cpu < 0 || !CPU_ISSET(cpu, &allowed) || CPU_COUNT(&allowed) < 2) return false;
  cpu_set_t others = allowed;
  CPU_CLR(cpu, &others);
  if (sched_setaffinity(0, sizeof(others), &others) != 0) return false;
  if (g_counting.load(std::memory_order_relaxed)) g_moves.fetch_add(1);
  return true;
#else
  (void)cpu;
  (void)allowed;
  return false;
#endif
}

struct Job {
  static constexpr int kMaxThreads = 64;
  PoolTask task = nullptr;
  void* ctx = nullptr;
  int threads = 1;
  bool fit_to_cores = true;     // false: all its threads even without free cores (tests)
  std::atomic<int> arrived{0};  // barrier: threads that reached the current one
  WaitWord phase;               // barrier: completed barriers
  std::atomic<int> cpu[kMaxThreads];  // the CPU each thread last reached a barrier on
  const cpu_set_t* allowed = nullptr;  // the CPUs the process may use
  bool moved[kMaxThreads] = {};        // workers moved off a CPU (leave_cpu), each its own entry
  const OpenMP* openmp = nullptr;      // run as a parallel region of this runtime (see openmp())
  std::exception_ptr error;
  std::mutex error_mutex;

  Job() {
    for (auto& c : cpu) c.store(-1, std::memory_order_relaxed);
  }

  // While thread tid waits inside the job: when another thread of the job was last
  // seen on tid's current CPU, spinning only keeps that thread from running, so
  // tid acts on it (colocation_action). Returns false: the wait goes on spinning.
  bool share_a_cpu(int tid) {
    const int me = current_cpu();
    int seen[kMaxThreads];
    const int n = std::min(threads, kMaxThreads);
    for (int t = 0; t < n; ++t) seen[t] = cpu[t].load(std::memory_order_relaxed);
    switch (colocation_decision(tid, me, seen, n, allowed)) {
      case Colocated::kSpin:
        break;
      case Colocated::kMove:
        if (leave_cpu(me, *allowed)) {
          moved[tid] = true;
          cpu[tid].store(current_cpu(), std::memory_order_relaxed);
          break;
        }
        [[fallthrough]];
      case Colocated::kYield:
        sched_yield();
        break;
    }
    return false;
  }

  void barrier() {
    if (threads <= 1) return;
    if (openmp) return openmp->barrier();
    const unsigned p = phase.load();
    const int tid = t_tid;
    if (tid < kMaxThreads) cpu[tid].store(current_cpu(), std::memory_order_relaxed);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(p + 1);
      return;
    }
    wait_for(phase, [p](unsigned now) { return now != p; }, job_spin(), g_barrier_waits,
             [this, tid] { return share_a_cpu(tid); });
  }

  static Clock::duration job_spin() {
    return g_never_spin.load(std::memory_order_relaxed) ? Clock::duration::zero()
                                                         : Clock::duration(kJobSpin);
  }

  void run(int tid) {
    t_tid = tid;
    try {
      task(ctx, tid);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  }
};

class Pool {
 public:
  Pool() {
    CPU_ZERO(&allowed_);
    if (sched_getaffinity(0, sizeof(allowed_), &allowed_) != 0) CPU_ZERO(&allowed_);
  }

  // The threads a job asking for `threads` takes now: with `fit`, no more than the
  // cores that other running threads leave free (unless a test turned fitting off).
  int threads_for(int threads, bool fit) const {
    if (!fit || !g_fit_to_cores.load(std::memory_order_relaxed)) return threads;
    return usable_threads(threads, 1 + awake_workers());
  }

  // Runs the job on its threads (fewer when the machine has no free core for
  // them); false (nothing run) when another caller holds the pool or when one
  // thread is all it gets.
  bool run(Job& job) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    const int asked = job.threads;
    job.threads = threads_for(job.threads, job.fit_to_cores);
    if (g_counting.load(std::memory_order_relaxed) && job.threads < asked) g_jobs_fewer.fetch_add(1);
    if (job.threads <= 1) return false;
    if (!grow(job.threads - 1)) return false;
    finished_.store(0);  // the workers of the last job have all counted themselves
    job.allowed = &allowed_;
    job.cpu[0].store(current_cpu(), std::memory_order_relaxed);
    if (g_counting.load(std::memory_order_relaxed)) g_jobs.fetch_add(1);
    {
      // The job and its generation change together, under the lock the workers read
      // them under. A worker woken by an earlier generation (pool_prepare's) that
      // read this job with the generation before it would, once done, see "a new
      // generation" and run the same job a second time, on a dead stack frame: it
      // then waited at that job's barrier forever, and the next job for it (seen:
      // a --peers run hung, the caller at a GRU job's barrier, the worker at an
      // int8 LSTM's).
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      job_threads_ = job.threads;
      const long delay_ns = g_publish_delay_ns.load(std::memory_order_relaxed);
      if (delay_ns > 0) std::this_thread::sleep_for(std::chrono::nanoseconds(delay_ns));
      signaled_at_.store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
      generation_.add(1);
    }
    job.run(0);
    const unsigned workers = static_cast<unsigned>(job.threads - 1);
    wait_for(finished_, [workers](unsigned n) { return n == workers; }, Job::job_spin(),
             g_finish_waits, [&job] { return job.share_a_cpu(0); });
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = nullptr;  // the frame goes with this call: no worker may find it later
      job_threads_ = 0;
    }
    return true;
  }

  // Wakes the workers that sleep between jobs, for a job about to come: they
  // then spin for it a while (kJobSpin) instead of sleeping at once, so their
  // wake-up overlaps the caller's work before the job. Nothing while another
  // caller's job runs (its workers are awake anyway).
  void prepare(int threads) {
    if (threads <= 1 || static_cast<int>(workers_) == 0 || generation_.sleepers() == 0) return;
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return;
    const long spin_ns = g_prewake_spin_ns.load(std::memory_order_relaxed);
    const Clock::duration spin = spin_ns < 0 ? Clock::duration(kJobSpin)
                                             : Clock::duration(std::chrono::nanoseconds(spin_ns));
    prewake_until_.store((Clock::now() + spin).time_since_epoch().count(), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = nullptr;  // a generation without a job: the workers look, and wait again
      job_threads_ = 0;
    }
    if (g_counting.load(std::memory_order_relaxed)) g_prewakes.fetch_add(1);
    signaled_at_.store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
    generation_.add(1);
  }

  // The call's job runs elsewhere (on an OpenMP team, or on the caller alone): the
  // workers prepare() woke go back to sleep instead of spinning on cores others need.
  void cancel_prepare() {
    if (prewake_until_.load(std::memory_order_relaxed) != 0)
      prewake_until_.store(0, std::memory_order_relaxed);
  }

  // The time a sleeping worker took to start after it was signalled, averaged over
  // about the last 8 wake-ups (0 before the first): about 5 us on bare metal, 0.1 to
  // 1.5 ms on a virtual machine whose CPU halted while the worker slept.
  Clock::duration wake_cost() const {
    return Clock::duration(static_cast<Clock::rep>(wake_cost_.load(std::memory_order_relaxed)));
  }
  void set_wake_cost(Clock::duration cost) {
    wake_cost_.store(static_cast<double>(cost.count()), std::memory_order_relaxed);
  }

  int sleeping_workers() const { return generation_.sleepers(); }

  // Workers not asleep between jobs (spinning for the next, or working): running
  // threads of ours, not of others. Workers prepare() woke are runnable before
  // they stop counting as sleepers (the wake-up takes up to a millisecond on a VM).
  int awake_workers() const {
    if (Clock::now().time_since_epoch().count() < prewake_until_.load(std::memory_order_relaxed))
      return static_cast<int>(workers_);
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
      const Clock::duration prewoken =
          Clock::duration(prewake_until_.load(std::memory_order_relaxed)) - Clock::now().time_since_epoch();
      const bool was_prewoken = prewoken > Clock::duration::zero();
      if (wait_idle(generation_, [&seen](unsigned now) { return now != seen; },
                    std::max(prewoken, Clock::duration::zero()), [this, was_prewoken] {
                      return was_prewoken && prewake_until_.load(std::memory_order_relaxed) == 0;
                    })) {
        const double took = static_cast<double>(Clock::now().time_since_epoch().count() -
                                                signaled_at_.load(std::memory_order_relaxed));
        const double before = wake_cost_.load(std::memory_order_relaxed);
        if (took > 0 && !g_wake_cost_fixed.load(std::memory_order_relaxed))
          wake_cost_.store(before == 0 ? took : before + (took - before) / 8, std::memory_order_relaxed);
      }
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
      if (tid < Job::kMaxThreads && job->moved[tid]) sched_setaffinity(0, sizeof(allowed_), &allowed_);
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
  std::atomic<Clock::rep> prewake_until_{0};  // prepare(): idle workers spin until then
  std::atomic<Clock::rep> signaled_at_{0};    // when generation_ last changed
  std::atomic<double> wake_cost_{0};          // wake_cost(), in Clock ticks
  cpu_set_t allowed_;  // the CPUs the process may use, when the pool started
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

// ---------------------------------------------------------------------------
// The OpenMP team torch already has.
//
// torch runs its parallel ops on an OpenMP runtime (its wheels bring libgomp), whose
// workers spin for milliseconds after every region: inside a model, when lstmfast's
// call comes between torch's ops, those threads hold the cores. Counted as other
// running threads, they made every job of such a call run on the caller alone
// (LSTM T=100 N=8 H=256 inference after a torch op, 2 threads: 10.6 ms, against 5.3
// in a process without torch); given its own threads anyway, a job would have
// fought them for the cores. So when the process has loaded an OpenMP runtime with
// the GNU ABI (libgomp; LLVM's and Intel's export it too), a job is a parallel
// region of it, on the very threads that are spinning, and its barriers are the
// runtime's: one set of threads serves both libraries. Without one the pool's own
// threads run it. (struct OpenMP, the runtime's entry points, is above, with Job.)

#if defined(__linux__)
int find_openmp(struct dl_phdr_info* info, size_t, void* out) {
  const char* name = info->dlpi_name;
  if (!name || !(std::strstr(name, "libgomp") || std::strstr(name, "libiomp") ||
                 std::strstr(name, "libomp")))
    return 0;
  void* lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD);  // already loaded: no new one
  if (!lib) return 0;
  OpenMP omp;
  omp.parallel = reinterpret_cast<decltype(omp.parallel)>(dlsym(lib, "GOMP_parallel"));
  omp.barrier = reinterpret_cast<decltype(omp.barrier)>(dlsym(lib, "GOMP_barrier"));
  omp.thread_num = reinterpret_cast<decltype(omp.thread_num)>(dlsym(lib, "omp_get_thread_num"));
  omp.num_threads = reinterpret_cast<decltype(omp.num_threads)>(dlsym(lib, "omp_get_num_threads"));
  if (!omp.parallel || !omp.barrier || !omp.thread_num || !omp.num_threads) return 0;
  *static_cast<OpenMP*>(out) = omp;
  return 1;  // stop: found
}
#endif

// Whether the machine has cores free for all `threads` of a job, the pool's own
// awake workers counted as ours: when it has not, and an OpenMP runtime is loaded,
// the threads running are most likely the runtime's, spinning after torch's last
// op, and the job runs on them. When it has, the runtime's threads sleep, and a
// wake-up of the pool's workers is what the job pays either way: the pool's, which
// keep its threads on separate CPUs (colocation_decision), do it better (LSTM T=100
// N=8 H=256, 2 threads, calls 100 ms apart: 7.7 ms a call on the pool's, 15.7 ms
// as an OpenMP region, 5.1 back to back).
bool pool_has_free_cores(int threads);

// The loaded runtime, or null. Looked for at most every 100 ms until found (torch may
// be imported after lstmfast), never in a forked child of the process that found it:
// the child has none of the runtime's threads, which the runtime does not know.
const OpenMP* openmp() {
#if defined(__linux__)
  static std::atomic<const OpenMP*> found{nullptr};
  static std::atomic<Clock::rep> looked_at{0};
  static OpenMP runtime;
  static pid_t owner = 0;
  if (g_use_openmp.load(std::memory_order_relaxed) == 0) return nullptr;
  if (const OpenMP* omp = found.load(std::memory_order_acquire)) return getpid() == owner ? omp : nullptr;
  const Clock::rep now = Clock::now().time_since_epoch().count();
  Clock::rep last = looked_at.load(std::memory_order_relaxed);
  if (now - last < std::chrono::duration_cast<Clock::duration>(std::chrono::milliseconds(100)).count() ||
      !looked_at.compare_exchange_strong(last, now))
    return nullptr;
  static std::mutex looking;
  std::lock_guard<std::mutex> lock(looking);
  if (found.load() == nullptr && dl_iterate_phdr(&find_openmp, &runtime)) {
    owner = getpid();
    found.store(&runtime, std::memory_order_release);
  }
  return found.load() && getpid() == owner ? found.load() : nullptr;
#else
  return nullptr;
#endif
}

// One thread of a job run as an OpenMP region: its number and the team's size come
// from the runtime; denormals are flushed while it works, as on the pool's threads,
// and the runtime's thread gets its own mode back.
void openmp_thread(void* data) {
  Job& job = *static_cast<Job*>(data);
  const OpenMP& omp = *job.openmp;
  const int tid = omp.thread_num();
  if (tid == 0) job.threads = omp.num_threads();  // read by the task through pool_threads()
  omp.barrier();  // ... after this
  ScopedFlushDenormals flush;
  Job* outer = t_job;
  t_job = &job;
  job.run(tid);
  t_job = outer;
}

// The OpenMP runtime a job of `threads` (> 1) threads runs on now, or null for the pool.
const OpenMP* openmp_for_job(int threads) {
  const OpenMP* omp = openmp();
  if (omp && (g_use_openmp.load(std::memory_order_relaxed) == 2 || !pool_has_free_cores(threads)))
    return omp;
  return nullptr;
}

void run_job(int threads, PoolTask task, void* ctx, bool fit_to_cores) {
  Job job;
  job.task = task;
  job.ctx = ctx;
  job.fit_to_cores = fit_to_cores;
  job.threads = threads > 1 && t_job == nullptr ? threads : 1;
  Job* outer = t_job;
  if (const OpenMP* omp = job.threads > 1 ? openmp_for_job(job.threads) : nullptr) {
    job.openmp = omp;
    pool().cancel_prepare();
    if (g_counting.load(std::memory_order_relaxed)) g_jobs_openmp.fetch_add(1);
    job.openmp->parallel(&openmp_thread, &job, static_cast<unsigned>(job.threads), 0);
    if (job.error) std::rethrow_exception(job.error);
    return;
  }
  t_job = &job;
  if (job.threads > 1 && !pool().run(job)) {
    job.threads = 1;
    pool().cancel_prepare();  // nothing for the workers this call woke
    if (g_counting.load(std::memory_order_relaxed)) g_jobs_alone.fetch_add(1);
  }
  if (job.threads == 1) job.run(0);
  t_job = outer;
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace

void pool_run(int threads, PoolTask task, void* ctx) { run_job(threads, task, ctx, true); }

// Not when the job is bound for an OpenMP team, nor when the cores others leave free
// will make it run on the caller alone: a worker of ours spinning for it would take a
// core from that team's thread, which then finishes its part of the job late (LSTM
// int8 T=100 N=8 H=256, 2 threads, torch loaded: 3.6 ms a call against 1.7 without
// torch), or from the threads that keep the cores busy.
void pool_prepare(int threads) {
  if (threads <= 1 || t_job != nullptr || openmp_for_job(threads)) return;
  if (pool().threads_for(threads, true) < 2) return;  // as pool_run's jobs will be fitted
  pool().prepare(threads);
}

int pool_threads() { return t_job ? t_job->threads : 1; }

void pool_barrier() {
  if (t_job) t_job->barrier();
}

int pool_usable_threads(int wanted) {
  return wanted <= 1 ? 1 : usable_threads(wanted, 1 + pool().awake_workers());
}

void pool_set_never_spin(bool never) { g_never_spin.store(never); }

void pool_set_publish_delay_ns(long ns) { g_publish_delay_ns.store(ns); }

void pool_set_prewake_spin_ns(long ns) { g_prewake_spin_ns.store(ns); }

void pool_set_fit_to_cores(bool fit) { g_fit_to_cores.store(fit); }

void pool_set_others_running(int threads) { g_others_running.store(threads); }
void pool_set_runnable_reading(int threads) { g_runnable_reading.store(threads); }

void pool_set_use_openmp(int use) { g_use_openmp.store(use); }

namespace {
bool pool_has_free_cores(int threads) {
  return usable_threads(threads, 1 + pool().awake_workers()) >= threads;
}
}  // namespace

bool pool_openmp_found() { return openmp() != nullptr; }

long pool_sleeps() { return g_sleeps.load(); }

void pool_set_counting(bool on) {
  if (on && !g_counting.load()) {
    for (WaitCounters* c : {&g_barrier_waits, &g_idle_waits, &g_finish_waits}) c->reset();
    g_jobs = g_jobs_fewer = g_jobs_alone = 0;
    g_same_cpu = 0;
    g_moves = 0;
    g_prewakes = 0;
    g_jobs_openmp = 0;
  }
  g_counting.store(on);
}

SpinLimits pool_spin_limits(const long* idle_waits_ns, int count, long* idle_limits_ns) {
  Spin spin(kIdleSpinFloor, kIdleSpinCeiling);
  for (int i = 0; i < count; ++i) {
    spin.record(std::chrono::nanoseconds(idle_waits_ns[i]));
    idle_limits_ns[i] = static_cast<long>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(spin.limit()).count());
  }
  SpinLimits limits;
  limits.job_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(kJobSpin).count();
  limits.idle_floor_ns = static_cast<long>(kIdleSpinFloor);
  limits.idle_ceiling_ns = static_cast<long>(kIdleSpinCeiling);
  return limits;
}

int pool_sleeping_workers() { return pool().sleeping_workers(); }

double pool_wake_cost_ns() {
  return std::chrono::duration<double, std::nano>(pool().wake_cost()).count();
}

void pool_set_wake_cost_ns(double ns) {
  g_wake_cost_fixed.store(ns >= 0);
  pool().set_wake_cost(std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double, std::nano>(std::max(ns, 0.0))));
}

Colocated colocation_action(int tid, int my_cpu, const int* cpus, int threads,
                            const cpu_set_t* allowed) {
  return colocation_decision(tid, my_cpu, cpus, threads, allowed);
}

PoolCounts pool_counts() {
  PoolCounts c;
  c.jobs = g_jobs.load();
  c.jobs_fewer_threads = g_jobs_fewer.load();
  c.jobs_alone = g_jobs_alone.load();
  c.same_cpu = g_same_cpu.load();
  c.moves = g_moves.load();
  c.prewakes = g_prewakes.load();
  c.jobs_openmp = g_jobs_openmp.load();
  auto take = [](const WaitCounters& w, long (&into)[3]) {
    into[0] = w.waits.load();
    into[1] = w.sleeps.load();
    into[2] = w.nanoseconds.load();
  };
  take(g_barrier_waits, c.barrier);
  take(g_idle_waits, c.idle);
  take(g_finish_waits, c.finish);
  return c;
}

long pool_check_barriers(int threads, int steps, int* ran, long late_ns) {
  struct Check {
    std::atomic<int> reached[64];  // the last step each thread has reached
    std::atomic<long> violations{0};
    std::atomic<int> ran{1};
    int steps = 0;
    Clock::duration late{};
  } check;
  if (threads > 64) threads = 64;
  for (auto& r : check.reached) r.store(-1);
  check.steps = steps;
  check.late = std::chrono::duration_cast<Clock::duration>(std::chrono::nanoseconds(late_ns));
  run_job(threads, [](void* ctx, int tid) {
    Check& c = *static_cast<Check*>(ctx);
    const int nt = pool_threads();
    if (tid == 0) c.ran.store(nt);
    for (int k = 0; k < c.steps; ++k) {
      c.reached[tid].store(k);
      if (tid == nt - 1 && c.late > Clock::duration::zero()) {  // busy, as a slower share would be
        const Clock::time_point until = Clock::now() + c.late;
        while (Clock::now() < until) LSTMFAST_PAUSE();
      }
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
