/*
 * stall_witness: does this machine stall a running thread for milliseconds and count the stall
 * as the thread's CPU time? The hole finder (`make stretch`) measures stretches of a thread's
 * CPU time between two budget checks; a stall of the machine under the thread looks exactly
 * like a stretch of uncharged work. This probe runs, on every CPU, a thread pinned there that
 * does fixed slices of plain arithmetic (no memory traffic, no system calls but the clock) and
 * prints every slice whose CPU time exceeds the threshold, with the Unix time it started, so
 * the stalls can be matched with the hole finder's log (each line ends `| at <Unix time>`).
 * A stall seen by every CPU's thread at the same moment is the machine's (a virtual machine
 * paused by its host), not the process's.
 *
 * Usage: stall_witness <seconds> <threshold µs>   (make stall-witness SECONDS=600)
 * Output: one line per stall: `stall <Unix time s.µs> cpu <n> <cpu µs> cpu-time <wall µs>
 * wall`, then per CPU: slices, mean and longest slice.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double clock_us(clockid_t c) {
  struct timespec t;
  clock_gettime(c, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static double seconds, threshold, start;

static void *witness(void *arg) {
  long cpu = (long)arg;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  uint64_t x = (uint64_t)cpu + 1;
  long slices = 0;
  double total = 0, longest = 0, end = start + seconds * 1e6;
  while (clock_us(CLOCK_MONOTONIC) < end) {
    double c0 = clock_us(CLOCK_THREAD_CPUTIME_ID), w0 = clock_us(CLOCK_MONOTONIC);
    double at = clock_us(CLOCK_REALTIME);
    for (int i = 0; i < 20000; i++)  /* ~20-30 us of a 64-bit LCG */
      x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    double c = clock_us(CLOCK_THREAD_CPUTIME_ID) - c0;
    total += c;
    slices++;
    if (c > longest) longest = c;
    if (c >= threshold)
      printf("stall %.6f cpu %ld %.0f cpu-time %.0f wall\n", at / 1e6, cpu, c,
             clock_us(CLOCK_MONOTONIC) - w0);
  }
  printf("cpu %ld: %ld slices, mean %.1f us, longest %.0f us [%lu]\n", cpu, slices,
         total / slices, longest, (unsigned long)(x & 1));
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s <seconds> <threshold us>\n", argv[0]);
    return 2;
  }
  seconds = atof(argv[1]);
  threshold = atof(argv[2]);
  setvbuf(stdout, NULL, _IOLBF, 0);
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  pthread_t threads[256];
  if (cpus > 256) cpus = 256;
  start = clock_us(CLOCK_MONOTONIC);
  for (long i = 0; i < cpus; i++) pthread_create(&threads[i], NULL, witness, (void *)i);
  for (long i = 0; i < cpus; i++) pthread_join(threads[i], NULL);
  return 0;
}
