// How long it takes to make one received object durable, for the ways a store could lay it out on a
// file system (bench/README.md, "Results"). Not a test: a measurement behind a storage design choice.
//
// Each object (default 512 KB, a CT slice) "arrives" in pieces over `recv_ms` (busy wait), each piece
// written as it comes; the time measured is from the last piece to durable (what a C-STORE waits for).
//
//   a  a new file per object, writeback started as it fills, renamed, fdatasync + directory fsync
//      (the filesystem store's path for objects above its log's limit)
//   b  one pack file allocated and zero-filled before the run, objects written into it in place,
//      fdatasync (no metadata to commit: the best case of a pack-file store)
//   d  as b, the pack allocated with fallocate (unwritten extents) instead of zero-filled
//   e  as b, the pack growing by appends
//   f  as b, the pack zero-filled by a thread keeping 32 MB ahead of the objects (what sustained
//      ingest into fresh space would need)
//   g  a pre-zeroed log and a file per object: both written as it arrives (the file's writeback
//      started), fdatasync of the log, file renamed unflushed, syncfs every 32 objects in a thread
//      (the filesystem store's write-ahead-log path applied to large objects)
//
// Build and run (on the file system to measure; a fresh one per run):
//   gcc -O2 -o /tmp/flush_modes bench/flush_modes.c -lpthread
//   /tmp/flush_modes MODE COUNT RECV_MS DIR [PIECE_KB [OBJECT_KB]]
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static long object_size = 512 * 1024, piece = 64 * 1024;
static int root_fd, zero_fd;
static volatile long durable_end;
static volatile int sync_wanted;
static long zero_end;

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void busy(double ms) {
  double until = now_ms() + ms;
  while (now_ms() < until) {
  }
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static void *syncer(void *arg) {
  (void)arg;
  for (;;) {
    if (sync_wanted) {
      sync_wanted = 0;
      syncfs(root_fd);
    }
    usleep(200);
  }
  return NULL;
}

static void *zeroer(void *arg) {
  (void)arg;
  char *zeros = calloc(1, 1 << 20);
  for (long at = 0; at < zero_end;) {
    if (at < durable_end + (32L << 20)) {
      pwrite(zero_fd, zeros, 1 << 20, at);
      at += 1 << 20;
      if (at % (8L << 20) == 0) fdatasync(zero_fd);
    } else {
      usleep(500);
    }
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s a|b|d|e|f|g COUNT RECV_MS DIR [PIECE_KB [OBJECT_KB]]\n", argv[0]);
    return 2;
  }
  char mode = argv[1][0];
  int count = atoi(argv[2]);
  double recv_ms = atof(argv[3]);
  const char *dir = argv[4];
  if (argc > 5) piece = atol(argv[5]) * 1024;
  if (argc > 6) object_size = atol(argv[6]) * 1024;
  char *data = malloc(object_size), path[4096], dest[4096];
  memset(data, 7, object_size);
  double *latency = malloc(count * sizeof(double));
  root_fd = open(dir, O_RDONLY);
  snprintf(path, sizeof path, "%s/objects", dir);
  mkdir(path, 0755);
  int objects_fd = open(path, O_RDONLY);

  int pack = -1;
  long pack_size = (long)count * object_size + object_size;
  if (strchr("bdefg", mode)) {
    snprintf(path, sizeof path, "%s/pack", dir);
    pack = open(path, O_RDWR | O_CREAT, 0644);
    if (mode == 'b' || mode == 'g') {
      char *zeros = calloc(1, 1 << 20);
      for (long at = 0; at < pack_size; at += 1 << 20) pwrite(pack, zeros, 1 << 20, at);
    }
    if (mode == 'd') fallocate(pack, 0, 0, pack_size);
    fsync(pack);
    fsync(root_fd);
    pthread_t thread;
    if (mode == 'f') {
      zero_fd = pack;
      zero_end = pack_size;
      pthread_create(&thread, NULL, zeroer, NULL);
      usleep(100000);
    }
    if (mode == 'g') pthread_create(&thread, NULL, syncer, NULL);
  }

  double start = now_ms();
  for (int i = 0; i < count; i++) {
    snprintf(path, sizeof path, "%s/spool-%d", dir, i);
    snprintf(dest, sizeof dest, "%s/objects/%d.dcm", dir, i);
    int fd = (mode == 'a' || mode == 'g') ? open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644) : -1;
    for (long at = 0; at < object_size; at += piece) {
      busy(recv_ms * piece / object_size);
      if (fd >= 0) {
        pwrite(fd, data, piece, at);
        sync_file_range(fd, at, piece, SYNC_FILE_RANGE_WRITE);
      }
      if (pack >= 0) {
        long offset = (long)i * object_size + at;
        pwrite(pack, data, piece, offset);
        sync_file_range(pack, offset, piece, SYNC_FILE_RANGE_WRITE);
      }
    }
    double last_piece = now_ms();
    if (mode == 'a') {
      rename(path, dest);
      fdatasync(fd);
      fsync(objects_fd);
    } else {
      fdatasync(pack);
      durable_end = (long)(i + 1) * object_size;
      if (mode == 'g') {
        rename(path, dest);
        if (i % 32 == 31) sync_wanted = 1;
      }
    }
    latency[i] = now_ms() - last_piece;
    if (fd >= 0) close(fd);
  }
  double total = now_ms() - start, sum = 0;
  qsort(latency, count, sizeof(double), by_value);
  for (int i = 0; i < count; i++) sum += latency[i];
  printf("mode %c: %.0f objects/s; last piece -> durable p50 %.3f mean %.3f p99 %.3f max %.3f ms\n",
         mode, count / total * 1e3, latency[count / 2], sum / count, latency[count * 99 / 100],
         latency[count - 1]);
  return 0;
}
