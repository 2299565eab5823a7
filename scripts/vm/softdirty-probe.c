/*
 * softdirty-probe: does this kernel track soft-dirty pages?
 *
 * Maps two anonymous pages and touches both, clears the soft-dirty bits
 * (write "4" to /proc/self/clear_refs), writes to the first page only, and
 * reads bit 55 of both pages' /proc/self/pagemap entries. Soft-dirty works
 * when the written page has the bit and the untouched one does not. A
 * kernel built without CONFIG_MEM_SOFT_DIRTY accepts the clear_refs write
 * but never sets the bit.
 *
 * Prints one line, "VMTEST: soft-dirty works" or "VMTEST: soft-dirty missing
 * (...)", and exits 0 (works), 1 (missing) or 2 (the probe itself failed).
 * Built with gcc -static by scripts/vmtest for the VM's initramfs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PM_SOFT_DIRTY (1ULL << 55)
#define PM_PRESENT (1ULL << 63)

static int fail(const char *what)
{
    printf("VMTEST: soft-dirty probe error: %s: %s\n", what, strerror(errno));
    return 2;
}

static int pagemap_entry(int fd, const void *addr, long page, uint64_t *out)
{
    off_t off = (off_t)((uintptr_t)addr / (uintptr_t)page) * 8;
    return pread(fd, out, sizeof *out, off) == (ssize_t)sizeof *out ? 0 : -1;
}

static int clear_soft_dirty(void)
{
    int fd = open("/proc/self/clear_refs", O_WRONLY);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, "4", 1);
    close(fd);
    return n == 1 ? 0 : -1;
}

int main(void)
{
    long page = sysconf(_SC_PAGESIZE);
    volatile unsigned char *mem = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return fail("mmap");
    mem[0] = 1;
    mem[page] = 1;

    int pm = open("/proc/self/pagemap", O_RDONLY);
    if (pm < 0)
        return fail("open /proc/self/pagemap");
    if (clear_soft_dirty() < 0)
        return fail("write 4 to /proc/self/clear_refs");

    uint64_t before0, before1, after0, after1;
    if (pagemap_entry(pm, (const void *)mem, page, &before0) < 0 ||
        pagemap_entry(pm, (const void *)(mem + page), page, &before1) < 0)
        return fail("read pagemap");

    mem[0] = 2; /* the only write after the clear */

    if (pagemap_entry(pm, (const void *)mem, page, &after0) < 0 ||
        pagemap_entry(pm, (const void *)(mem + page), page, &after1) < 0)
        return fail("read pagemap");
    close(pm);

    if (!(after0 & PM_PRESENT) || !(after1 & PM_PRESENT)) {
        printf("VMTEST: soft-dirty probe error: pages not present\n");
        return 2;
    }
    int cleared = !(before0 & PM_SOFT_DIRTY) && !(before1 & PM_SOFT_DIRTY);
    int written_dirty = (after0 & PM_SOFT_DIRTY) != 0;
    int untouched_clean = (after1 & PM_SOFT_DIRTY) == 0;
    if (cleared && written_dirty && untouched_clean) {
        printf("VMTEST: soft-dirty works\n");
        return 0;
    }
    printf("VMTEST: soft-dirty missing (after clear: %d/%d, after write: "
           "written page %d, untouched page %d)\n",
           !!(before0 & PM_SOFT_DIRTY), !!(before1 & PM_SOFT_DIRTY),
           !!(after0 & PM_SOFT_DIRTY), !!(after1 & PM_SOFT_DIRTY));
    return 1;
}
