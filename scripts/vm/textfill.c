/*
 * textfill: hold N MiB of text in memory and sit idle, the workload that
 * scripts/peers migrates twice: as a host process with procmig and inside a
 * QEMU guest with QEMU's own migration.
 *
 *   textfill MIB [SEED]
 *
 * Maps MIB MiB of anonymous memory, fills every byte with newline-ended
 * records like
 *
 *   id=00001234 user=maria_0042 balance=001234.56 status=active city=Porto
 *
 * (the same shape as procmig-agent's text profile: zstd -1 packs it about
 * 3-4x), prints "READY pid=P mib=N base=0x... fill_ms=T" on stdout, flushes,
 * and then sleeps for ever without touching the memory again. Built with
 * gcc -O2 (gcc -static for the guest's initramfs); no libraries needed.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static const char *const names[32] = {
    "alice", "bruno", "carla", "diego", "elena", "farid", "greta", "hiro",
    "ines", "jonas", "kemal", "laura", "mateo", "nadia", "oscar", "paula",
    "quinn", "rosa", "samir", "tania", "ugo", "vera", "walter", "xenia",
    "yusuf", "zoe", "maria", "pedro", "lucia", "tomas", "sofia", "ivan",
};
static const char *const statuses[8] = {
    "active", "active", "active", "pending", "closed", "active", "frozen", "review",
};
static const char *const cities[16] = {
    "Lisbon", "Porto", "Madrid", "Paris", "Lyon", "Berlin", "Hamburg", "Vienna",
    "Prague", "Warsaw", "Oslo", "Dublin", "Rome", "Milan", "Athens", "Sofia",
};

/* A 64-bit xorshift-multiply generator (any decent mixer would do). */
static uint64_t rng_state;
static uint64_t next_rand(void)
{
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static char *put_str(char *p, const char *s)
{
    while (*s)
        *p++ = *s++;
    return p;
}

/* `n` as exactly `width` decimal digits (leading zeros). */
static char *put_digits(char *p, uint64_t n, int width)
{
    for (int i = width - 1; i >= 0; i--) {
        p[i] = (char)('0' + n % 10);
        n /= 10;
    }
    return p + width;
}

/* One record into `line`; returns its length (< 128). */
static size_t make_record(char *line, uint64_t id)
{
    uint64_t r = next_rand();
    char *p = line;
    p = put_str(p, "id=");
    p = put_digits(p, id % 100000000, 8);
    p = put_str(p, " user=");
    p = put_str(p, names[r & 31]);
    *p++ = '_';
    p = put_digits(p, (r >> 5) % 10000, 4);
    p = put_str(p, " balance=");
    p = put_digits(p, (r >> 20) % 1000000, 6);
    *p++ = '.';
    p = put_digits(p, (r >> 40) % 100, 2);
    p = put_str(p, " status=");
    p = put_str(p, statuses[(r >> 48) & 7]);
    p = put_str(p, " city=");
    p = put_str(p, cities[(r >> 56) & 15]);
    *p++ = '\n';
    return (size_t)(p - line);
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: textfill MIB [SEED]\n");
        return 2;
    }
    char *end;
    errno = 0;
    unsigned long mib = strtoul(argv[1], &end, 10);
    if (errno || *end || mib == 0 || mib > (1UL << 20)) {
        fprintf(stderr, "textfill: bad size %s (MiB, 1..1048576)\n", argv[1]);
        return 2;
    }
    rng_state = argc == 3 ? strtoull(argv[2], NULL, 0) : 0x9E3779B97F4A7C15ULL;
    if (rng_state == 0)
        rng_state = 1;

    size_t len = (size_t)mib << 20;
    char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("textfill: mmap");
        return 1;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    char line[128];
    uint64_t id = next_rand() % 100000000;
    size_t pos = 0;
    while (pos < len) {
        size_t n = make_record(line, id++);
        if (n > len - pos)
            n = len - pos;
        memcpy(mem + pos, line, n);
        pos += n;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long ms = (t1.tv_sec - t0.tv_sec) * 1000L + (t1.tv_nsec - t0.tv_nsec) / 1000000L;
    printf("READY pid=%d mib=%lu base=%p fill_ms=%ld\n", (int)getpid(), mib, (void *)mem, ms);
    fflush(stdout);
    for (;;)
        pause();
}
