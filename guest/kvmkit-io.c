/*
 * kvmkit-io: a small fio-like load generator for the guest kit (static;
 * guest/build-kit puts it in busybox.cpio as /bin/kvmkit-io).
 *
 *   kvmkit-io MODE DEVICE BLOCK_SIZE SECONDS [SPAN_MIB]
 *
 * MODE: seqread, seqwrite, randread or randwrite, with O_DIRECT on DEVICE (a
 * block device or file), one request in flight, for SECONDS (wall clock, by
 * CLOCK_MONOTONIC) over the first SPAN_MIB MiB (default: the whole device).
 * Prints one line:
 *
 *   kvmkit-io: MODE bs=BYTES ops=N seconds=S iops=I mbps=M
 *
 * Writes fill each block with a byte pattern; nothing is verified (the
 * integration tests check data; this only measures).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int usage(void)
{
	fprintf(stderr, "usage: kvmkit-io seqread|seqwrite|randread|randwrite DEVICE BLOCK_SIZE SECONDS [SPAN_MIB]\n");
	return 2;
}

int main(int argc, char **argv)
{
	if (argc < 5)
		return usage();
	const char *mode = argv[1], *path = argv[2];
	long bs = strtol(argv[3], NULL, 0);
	double seconds = strtod(argv[4], NULL);
	int writing = strstr(mode, "write") != NULL;
	int random = strncmp(mode, "rand", 4) == 0;
	if ((strcmp(mode + (random ? 4 : 3), "read") && strcmp(mode + (random ? 4 : 3), "write")) ||
	    bs < 512 || bs % 512 || bs > (64 << 20) || seconds <= 0)
		return usage();

	int fd = open(path, (writing ? O_RDWR : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		fprintf(stderr, "kvmkit-io: %s: %s\n", path, strerror(errno));
		return 1;
	}
	uint64_t size = 0;
	struct stat st;
	if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode))
		ioctl(fd, BLKGETSIZE64, &size);
	else
		size = st.st_size;
	if (argc > 5)
		size = (uint64_t)strtoull(argv[5], NULL, 0) << 20;
	uint64_t blocks = size / bs;
	if (blocks == 0) {
		fprintf(stderr, "kvmkit-io: %s is smaller than one block\n", path);
		return 1;
	}
	void *buf;
	if (posix_memalign(&buf, 4096, bs))
		return 1;
	memset(buf, 0x5a, bs);

	uint64_t ops = 0, seed = 0x9e3779b97f4a7c15ull, block = 0;
	double start = now(), elapsed = 0;
	while (elapsed < seconds) {
		if (random) {
			seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
			block = seed % blocks;
		} else if (block >= blocks) {
			block = 0;
		}
		ssize_t n = writing ? pwrite(fd, buf, bs, block * bs) : pread(fd, buf, bs, block * bs);
		if (n != bs) {
			fprintf(stderr, "kvmkit-io: %s at block %llu: %s\n", mode, (unsigned long long)block,
				n < 0 ? strerror(errno) : "short transfer");
			return 1;
		}
		ops++;
		block++;
		if ((ops & 15) == 0 || random)
			elapsed = now() - start;
	}
	elapsed = now() - start;
	printf("kvmkit-io: %s bs=%ld ops=%llu seconds=%.3f iops=%.0f mbps=%.1f\n", mode, bs,
	       (unsigned long long)ops, elapsed, ops / elapsed, ops * (double)bs / elapsed / 1e6);
	return 0;
}
