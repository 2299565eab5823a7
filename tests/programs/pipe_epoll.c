/* A writer thread sends sequence numbers through a pipe and counts them
 * on an eventfd; the main thread waits on both with epoll (and a timerfd
 * ticking), checks that numbers arrive in order and match the eventfd
 * count, and appends "ok <n>" (or "BAD ...") to a file every 50 numbers. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

static int p[2], efd;

static void *writer(void *arg) {
    (void)arg;
    for (uint64_t n = 1;; n++) {
        if (write(p[1], &n, 8) != 8) abort();
        uint64_t one = 1;
        if (write(efd, &one, 8) != 8) abort();
        usleep(2000);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    FILE *out = fopen(argv[1], "a");
    if (!out || pipe(p) || (efd = eventfd(0, EFD_NONBLOCK)) < 0) return 1;
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec its = {{0, 20 * 1000 * 1000}, {0, 20 * 1000 * 1000}};
    timerfd_settime(tfd, 0, &its, NULL);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0x1111};
    epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev);
    ev.data.u64 = 0x2222;
    epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev);
    ev.data.u64 = 0x3333;
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    pthread_t t;
    pthread_create(&t, NULL, writer, NULL);
    uint64_t expect = 1, counted = 0, ticks = 0;
    for (;;) {
        struct epoll_event got[4];
        int n = epoll_wait(ep, got, 4, 1000);
        for (int i = 0; i < n; i++) {
            uint64_t v;
            if (got[i].data.u64 == 0x1111) {
                if (read(p[0], &v, 8) != 8) abort();
                if (v != expect) {
                    fprintf(out, "BAD got %llu want %llu\n", (unsigned long long)v, (unsigned long long)expect);
                    fflush(out);
                    return 3;
                }
                if (expect % 50 == 0) {
                    fprintf(out, "ok %llu counted %llu ticks %llu\n", (unsigned long long)expect,
                            (unsigned long long)counted, (unsigned long long)ticks);
                    fflush(out);
                }
                expect++;
            } else if (got[i].data.u64 == 0x2222) {
                if (read(efd, &v, 8) == 8) counted += v;
            } else if (got[i].data.u64 == 0x3333) {
                if (read(tfd, &v, 8) == 8) ticks += v;
            } else {
                fprintf(out, "BAD epoll data %llx\n", (unsigned long long)got[i].data.u64);
                fflush(out);
                return 4;
            }
        }
        if (counted + 10 < expect - 1) {
            fprintf(out, "BAD eventfd counted %llu < %llu\n", (unsigned long long)counted,
                    (unsigned long long)(expect - 1));
            fflush(out);
            return 5;
        }
    }
}
