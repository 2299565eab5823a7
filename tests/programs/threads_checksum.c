/* Four threads, each writing to its own malloc'd buffer and appending a
 * line "t<id> <seq> <checksum>" to one file. After a migration with
 * restore, every thread's sequence must go on without a gap or a repeat,
 * and each checksum must be the one an unmigrated run computes. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static FILE *out;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static void *work(void *arg) {
    long id = (long)arg;
    size_t words = (8u << 20) / 8;
    uint64_t *buf = calloc(words, 8);
    uint64_t sum = 0;
    for (uint64_t seq = 0;; seq++) {
        for (size_t i = 0; i < words; i += 512) {
            buf[i] = buf[i] * 6364136223846793005ull + seq + id;
            sum ^= buf[i] + i;
        }
        pthread_mutex_lock(&mu);
        fprintf(out, "t%ld %llu %llu\n", id, (unsigned long long)seq, (unsigned long long)sum);
        fflush(out);
        pthread_mutex_unlock(&mu);
        usleep(10000);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    out = fopen(argv[1], "a");
    if (!out) return 1;
    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, work, (void *)i);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    return 0;
}
