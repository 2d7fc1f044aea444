// uapi-probe: asks the running kernel what its VDUSE and ublk control devices support,
// and prints it as key=value words for the probe test of tests/guest/kernel/init:
//   vduse_api=N              VDUSE_GET_API_VERSION on /dev/vduse/control
//   ublk_features=0xHEX      UBLK_U_CMD_GET_FEATURES on /dev/ublk-control (io_uring
//                            uring_cmd, the only way to ask: sysfs does not show them)
//   ublk_feature_names=a,b   the bits decoded (names from include/uapi/linux/ublk_cmd.h;
//                            bits this file does not know print as bitN)
// A failure prints the key with err_<errno name or number>. Exit status 0 when both
// answered, 1 otherwise. Self-contained (own copies of the uapi constants), built static
// by build.sh so the guest needs no libraries for it.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <linux/types.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

// include/uapi/linux/vduse.h
#define VDUSE_BASE 0x81
#define VDUSE_GET_API_VERSION _IOR(VDUSE_BASE, 0x00, __u64)

// include/uapi/linux/ublk_cmd.h
struct ublksrv_ctrl_cmd {
    __u32 dev_id;
    __u16 queue_id;
    __u16 len;
    __u64 addr;
    __u64 data[1];
    __u16 dev_path_len;
    __u16 pad;
    __u32 reserved;
};
#define UBLK_U_CMD_GET_FEATURES _IOR('u', 0x13, struct ublksrv_ctrl_cmd)

static const char *const ublk_bits[] = {
    "SUPPORT_ZERO_COPY",     // 0
    "URING_CMD_COMP_IN_TASK", // 1
    "NEED_GET_DATA",         // 2
    "USER_RECOVERY",         // 3
    "USER_RECOVERY_REISSUE", // 4
    "UNPRIVILEGED_DEV",      // 5
    "CMD_IOCTL_ENCODE",      // 6
    "USER_COPY",             // 7
    "ZONED",                 // 8
    // bits 9.. came after 6.12: USER_RECOVERY_FAIL_IO (9), UPDATE_SIZE (10),
    // AUTO_BUF_REG (11), QUIESCE (12), ... They print as bitN here.
};

static const char *errname(int e)
{
    static char buf[32];
    switch (e) {
    case ENOENT: return "ENOENT";
    case ENODEV: return "ENODEV";
    case ENXIO: return "ENXIO";
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case EINVAL: return "EINVAL";
    case ENOTTY: return "ENOTTY";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case ENOSYS: return "ENOSYS";
    }
    snprintf(buf, sizeof(buf), "%d", e);
    return buf;
}

static int vduse_api(void)
{
    __u64 v = 0;
    int fd = open("/dev/vduse/control", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        printf("vduse_api=err_%s", errname(errno));
        return -1;
    }
    if (ioctl(fd, VDUSE_GET_API_VERSION, &v) < 0) {
        printf("vduse_api=err_%s", errname(errno));
        close(fd);
        return -1;
    }
    printf("vduse_api=%llu", (unsigned long long)v);
    close(fd);
    return 0;
}

// One UBLK_U_CMD_GET_FEATURES through a 128-byte-SQE io_uring: returns cqe.res, or
// -errno of the failing setup step.
static int ublk_get_features(int cfd, __u64 *features)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SQE128;
    int rfd = (int)syscall(__NR_io_uring_setup, 4, &p);
    if (rfd < 0)
        return -errno;
    size_t sq_sz = p.sq_off.array + p.sq_entries * sizeof(__u32);
    size_t cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = p.features & IORING_FEAT_SINGLE_MMAP;
    if (single && cq_sz > sq_sz)
        sq_sz = cq_sz;
    char *sq = mmap(NULL, sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, rfd,
                    IORING_OFF_SQ_RING);
    if (sq == MAP_FAILED)
        return -errno;
    char *cq = sq;
    if (!single) {
        cq = mmap(NULL, cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, rfd,
                  IORING_OFF_CQ_RING);
        if (cq == MAP_FAILED)
            return -errno;
    }
    size_t sqe_sz = 2 * sizeof(struct io_uring_sqe); // SQE128
    char *sqes = mmap(NULL, p.sq_entries * sqe_sz, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_POPULATE, rfd, IORING_OFF_SQES);
    if (sqes == MAP_FAILED)
        return -errno;

    unsigned *sq_tail = (unsigned *)(sq + p.sq_off.tail);
    unsigned sq_mask = *(unsigned *)(sq + p.sq_off.ring_mask);
    unsigned *sq_array = (unsigned *)(sq + p.sq_off.array);
    unsigned tail = *sq_tail;
    unsigned idx = tail & sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)(sqes + idx * sqe_sz);
    memset(sqe, 0, sqe_sz);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = cfd;
    sqe->cmd_op = UBLK_U_CMD_GET_FEATURES;
    struct ublksrv_ctrl_cmd *c = (struct ublksrv_ctrl_cmd *)sqe->cmd;
    c->dev_id = (__u32)-1;
    c->queue_id = (__u16)-1;
    c->len = sizeof(*features);
    c->addr = (__u64)(uintptr_t)features;
    sq_array[idx] = idx;
    __atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);

    if (syscall(__NR_io_uring_enter, rfd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0)
        return -errno;
    unsigned *cq_head = (unsigned *)(cq + p.cq_off.head);
    unsigned *cq_tail = (unsigned *)(cq + p.cq_off.tail);
    unsigned cq_mask = *(unsigned *)(cq + p.cq_off.ring_mask);
    struct io_uring_cqe *cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    unsigned head = *cq_head;
    if (head == __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE))
        return -EAGAIN;
    int res = cqes[head & cq_mask].res;
    __atomic_store_n(cq_head, head + 1, __ATOMIC_RELEASE);
    close(rfd);
    return res;
}

static int ublk_features(void)
{
    __u64 f = 0;
    int cfd = open("/dev/ublk-control", O_RDWR | O_CLOEXEC);
    if (cfd < 0) {
        printf("ublk_features=err_%s", errname(errno));
        return -1;
    }
    int res = ublk_get_features(cfd, &f);
    close(cfd);
    if (res < 0) {
        printf("ublk_features=err_%s", errname(-res));
        return -1;
    }
    printf("ublk_features=0x%llx ublk_feature_names=", (unsigned long long)f);
    const char *sep = "";
    for (unsigned b = 0; b < 64; b++) {
        if (!(f & (1ULL << b)))
            continue;
        if (b < sizeof(ublk_bits) / sizeof(ublk_bits[0]))
            printf("%s%s", sep, ublk_bits[b]);
        else
            printf("%sbit%u", sep, b);
        sep = ",";
    }
    if (!f)
        printf("none");
    return 0;
}

int main(void)
{
    int rc = 0;
    if (vduse_api() < 0)
        rc = 1;
    printf(" ");
    if (ublk_features() < 0)
        rc = 1;
    printf("\n");
    return rc;
}
