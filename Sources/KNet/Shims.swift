#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import CKNet

// The C core calls these shims with a context object as `ud`; the Swift objects live as
// long as a serve call (the context) or as long as the C connection delivers callbacks
// (the TCPConnection, held retained in the C connection's userdata).

/// Per-thread scratch storage of the Swift codec path. A Swift codec's decoded message is
/// parked here by the read shim and taken by the receive shim that the core calls right
/// after on the same loop thread, so the array reaches the handler without a second copy;
/// likewise `send([UInt8])` parks the array for the write shim on the sending thread.
/// Only its own thread touches a slot, and no access to a field overlaps another, so the
/// per-message dynamic exclusivity checks (a thread-local access set) are left out.
final class ThreadSlot {
    @exclusivity(unchecked) var decoded: [UInt8] = []
    @exclusivity(unchecked) var decodedBase: UnsafeRawPointer?
    @exclusivity(unchecked) var outgoing: [UInt8]?
    @exclusivity(unchecked) var outgoingBase: UnsafeRawPointer?
    /// The array the loop's next raw read goes into (see `readAlloc`): empty, the read
    /// fills its spare capacity, and a receive appends those bytes in place and hands it
    /// over. When the handler did not keep it, the next read reuses the same storage.
    @exclusivity(unchecked) var spare: [UInt8] = []
    @exclusivity(unchecked) var spareBase: UnsafeMutableRawPointer?
    /// Capacity of the next new spare; follows the size of the last large read.
    @exclusivity(unchecked) var spareCapacity = 0
    /// Reads in a row that used under a quarter of the spare; at `shrinkAfter` the spare
    /// is sized down.
    @exclusivity(unchecked) var shortReads = 0
    /// The array a small message (under `handOverMinimum`, or a read that used little of
    /// a large spare) is copied into and handed over in. When the handler did not keep it,
    /// the next such message reuses its storage: it costs a copy but no allocation.
    @exclusivity(unchecked) var small: [UInt8] = []

    /// After a receive of the spare itself: empties it, keeping the storage when the
    /// handler did not keep the array (else `removeAll` gives it fresh storage), or drops
    /// it when reads outgrew it, so `readAlloc` makes a larger one.
    func recycleSpare() {
        if spare.capacity < spareCapacity {
            spare = []
            spareBase = nil
            return
        }
        spare.removeAll(keepingCapacity: true)
        spareBase = spare.withUnsafeMutableBufferPointer { UnsafeMutableRawPointer($0.baseAddress) }
    }

    /// The small array, now holding a copy of `bytes`: its storage is reused unless the
    /// handler kept the last message (then the replace makes fresh storage). A kept array
    /// pins its capacity, so storage of more than 4 × the message (or 64 bytes) is not
    /// reused for it. Moved out of the slot (see `take`); `deliver` moves it back.
    func smallMessage(_ bytes: UnsafeRawBufferPointer) -> [UInt8] {
        let bound = max(4 * bytes.count, smallSlack)
        if small.capacity > bound { small = [] }
        small.replaceSubrange(0..<small.count, with: bytes)
        // When the handler kept the last message, the replace copies into new storage of
        // the old capacity, which the allocator may round up past the bound (glibc hands
        // out a whole free chunk up to 16 bytes larger): then one of this message's size.
        if small.capacity > bound { small = Array(bytes) }
        return take(&small)
    }

    /// The calling thread's slot, created on first use and freed when the thread exits.
    static var current: ThreadSlot {
        if let raw = pthread_getspecific(threadSlotKey) {
            return Unmanaged<ThreadSlot>.fromOpaque(raw).takeUnretainedValue()
        }
        let slot = ThreadSlot()
        pthread_setspecific(threadSlotKey, Unmanaged.passRetained(slot).toOpaque())
        return slot
    }
}

/// Moves the array out of `field`, leaving it empty. A message handed to the handler this
/// way and moved back after it costs no retain and release (two atomics per message, as a
/// copy of the slot's reference does); the array stays unique unless the handler kept it.
@inline(__always)
private func take(_ field: inout [UInt8]) -> [UInt8] {
    var array: [UInt8] = []
    swap(&array, &field)
    return array
}

/// Which of the slot's arrays a message is in, for `deliver` to put it back.
private enum MessageSource { case spare, small, other }

private let threadSlotKey: pthread_key_t = {
    var key = pthread_key_t()
    let rc = pthread_key_create(&key) { raw in
        guard let raw else { return }
        Unmanaged<ThreadSlot>.fromOpaque(raw).release()
    }
    precondition(rc == 0, "pthread_key_create failed")
    return key
}()

/// A Swift codec, boxed so the C codec can point at it.
final class SwiftCodecBox: Sendable {
    let codec: any Codec
    /// The core's bound on the bytes one frame consumes: `maxFrameSize`, 0 = 16 MiB
    /// (`KNET_DEFAULT_MAX_FRAME`).
    let maxFrame: Int
    init(_ codec: any Codec) {
        self.codec = codec
        let size = codec.maxFrameSize
        maxFrame = size > 0 ? size : 16 << 20
    }
}

/// The current connection of a client (for `TCPClient.connection`).
final class ConnectionSlot: Sendable {
    let value = LockedValue<TCPConnection?>(nil)
}

/// What the C handler's `ud` points at for one serve call (`listenAndServe` / `dialAndServe`).
final class ServeContext: Sendable {
    /// The handler, owned here for the whole serve call, inside which every callback runs.
    /// Connections refer to it unowned: a handler that keeps its connections forms no
    /// reference cycle with them. (See `HandlerBox` for why it is boxed.)
    let handler: HandlerBox
    let codecOwner: (any AnyObject & Sendable)?
    let swiftCodec: Bool
    /// The raw codec: a message is one read, so reads go straight into arrays (`readAlloc`).
    let rawCodec: Bool
    let clientSlot: ConnectionSlot?

    init(handler: any TCPHandler, codecOwner: (any AnyObject & Sendable)?, swiftCodec: Bool,
         rawCodec: Bool, clientSlot: ConnectionSlot?) {
        self.handler = HandlerBox(handler)
        self.codecOwner = codecOwner
        self.swiftCodec = swiftCodec
        self.rawCodec = rawCodec
        self.clientSlot = clientSlot
    }
}

/// A handler in an immutable field. Called as `box._withUnsafeGuaranteedRef {
/// $0.handler.receive(...) }`, the existential is opened where it lies; called through a
/// mutable field, a pointer or a plain class reference it is copied first (for a class
/// handler a retain and a release, an atomic on one object every loop thread shares),
/// per message.
final class HandlerBox: Sendable {
    let handler: any TCPHandler
    init(_ handler: any TCPHandler) { self.handler = handler }
}

/// Builds the C handler and codec for one serve call and runs `body` with them; the
/// context and codec storage live until `body` returns (and after, in kept connections).
func withServeContext(handler: (any TCPHandler)?, codec: (any Codec)?, clientSlot: ConnectionSlot?,
                      _ body: (UnsafePointer<knet_handler>, UnsafePointer<knet_codec>) -> Int32) -> Int32 {
    _ = knetLoggingInstalled
    var cCodec: knet_codec
    let owner: (any AnyObject & Sendable)?
    let swiftCodec: Bool
    if let codec {
        if let builtin = codec as? any BuiltinCCodec {
            (cCodec, owner) = builtin.makeCCodec()
            swiftCodec = false
        } else {
            let box = SwiftCodecBox(codec)
            cCodec = knet_codec(read: swiftCodecRead, write: swiftCodecWrite,
                                ud: Unmanaged.passUnretained(box).toOpaque(),
                                max_frame: max(0, codec.maxFrameSize))
            owner = box
            swiftCodec = true
        }
    } else {
        cCodec = knet_default_codec
        owner = nil
        swiftCodec = false
    }
    let context = ServeContext(handler: handler ?? DefaultTCPHandler(), codecOwner: owner,
                               swiftCodec: swiftCodec, rawCodec: cCodec.read == nil,
                               clientSlot: clientSlot)
    var cHandler = knet_handler(connect: connectShim, receive: receiveShim,
                                ud: Unmanaged.passUnretained(context).toOpaque())
    return withExtendedLifetime((context, owner)) {
        body(&cHandler, &cCodec)
    }
}

/// connect(true) creates the connection's one TCPConnection and parks a retained
/// reference in the C userdata; connect(false) delivers it a last time and releases it.
/// Every callback goes through the connection's own handler reference (see `receiveShim`).
private func connectShim(_ conn: OpaquePointer?, _ connected: Bool, _ ud: UnsafeMutableRawPointer?) {
    guard let conn, let ud else { return }
    let context = Unmanaged<ServeContext>.fromOpaque(ud).takeUnretainedValue()
    if connected {
        // connect(true) runs on the connection's loop thread: its slot is this thread's.
        // Loop threads never exit, so the slot outlives the connection.
        let slot = ThreadSlot.current
        let tcp = TCPConnection(handle: conn, loopSlot: slot, handler: .passUnretained(context.handler),
                                swiftCodec: context.swiftCodec, rawCodec: context.rawCodec,
                                codecOwner: context.codecOwner)
        knet_conn_set_userdata(conn, Unmanaged.passRetained(tcp).toOpaque())
        if context.rawCodec { _ = knet_conn_set_alloc(conn, readAlloc, Unmanaged.passUnretained(slot).toOpaque()) }
        context.clientSlot?.value.withLock { $0 = tcp }
        tcp.handler._withUnsafeGuaranteedRef { $0.handler.connect(tcp, connected: true) }
    } else {
        guard let raw = knet_conn_userdata(conn) else { return }
        let reference = Unmanaged<TCPConnection>.fromOpaque(raw)
        let tcp = reference.takeUnretainedValue()
        tcp.handler._withUnsafeGuaranteedRef { $0.handler.connect(tcp, connected: false) }
        // Current until its connect(false) ran, as knet_client_conn is (README).
        context.clientSlot?.value.withLock { current in
            if current === tcp { current = nil }
        }
        // The last callback: drop what could refer back to the connection (no cycle).
        tcp.dropUserdata()
        knet_conn_set_userdata(conn, nil)
        reference.release()
    }
}

/// The C drain notification of `TCPConnection.whenDrained`: runs its body on the loop
/// thread. Only while the connection is open, so its userdata holds the TCPConnection.
func drainedShim(_ conn: OpaquePointer?, _ ud: UnsafeMutableRawPointer?) {
    guard let conn, let raw = knet_conn_userdata(conn) else { return }
    let tcp = Unmanaged<TCPConnection>.fromOpaque(raw).takeUnretainedValue()
    tcp.takeDrainedBody(request: UInt(bitPattern: ud))?(tcp)
}

/// Smallest read handed over in the spare array itself; smaller ones are copied (into the
/// slot's small array), so a kept small message does not pin a large buffer.
private let handOverMinimum = 1024

/// Short reads in a row (under a quarter of the spare) after which the spare is sized down.
private let shrinkAfter = 4

/// Capacity a small array may have whatever its count (the allocator's rounding).
private let smallSlack = 64

/// What an array's allocation holds besides its elements (its header, the allocator's
/// rounding). A spare asked for with this much less than a power of two gets no more
/// than the power of two, so a read of a quarter of that is handed over: asked for in
/// full, a 4 KiB spare has 4104 bytes and reads of 1024 and 1025 bytes were copied for
/// ever (the spare remade at the same size after every four).
private let spareOverhead = 64

/// The capacity of a spare array for reads of `length` bytes: room to spare (a read that
/// fills the buffer costs a second read), a power of two from 4 KiB to 64 KiB less
/// `spareOverhead`.
private func spareCapacity(for length: Int) -> Int {
    var capacity = 4096
    while capacity - spareOverhead <= length && capacity < 65_536 { capacity <<= 1 }
    return capacity - spareOverhead
}

/// The bytes a read already put in an array's spare capacity: appending this sequence
/// makes them the array's elements without copying them. Sound for UInt8 only, which has
/// no invalid values, and only when the array is unique (so the append keeps its storage).
private struct BytesInPlace: Sequence, IteratorProtocol {
    let count: Int
    var underestimatedCount: Int { count }
    mutating func next() -> UInt8? { nil }
    func _copyContents(initializing buffer: UnsafeMutableBufferPointer<UInt8>) -> (BytesInPlace, Int) {
        precondition(count <= buffer.count, "read past the spare capacity")
        return (BytesInPlace(count: 0), count)
    }
}

/// The C alloc callback of raw-codec connections (loop thread; `ud` is that thread's slot,
/// borrowed): the read goes into the spare capacity of the slot's empty spare array, which
/// `receiveShim` hands to the handler without a copy.
private func readAlloc(_ conn: OpaquePointer?, _ suggested: Int, _ capacity: UnsafeMutablePointer<Int>?,
                       _ ud: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    guard let capacity, let ud else { return nil }
    return Unmanaged<ThreadSlot>.fromOpaque(ud)._withUnsafeGuaranteedRef { slot in
        if slot.spareBase == nil {
            // reserveCapacity allocates through the specialized path (no generic metadata
            // lookup). The storage does not move while the slot holds the only reference
            // and leaves it alone, so the core may write into its capacity via `spareBase`.
            slot.spare = []
            slot.spare.reserveCapacity(slot.spareCapacity > 0 ? slot.spareCapacity : suggested)
            slot.spareBase = slot.spare.withUnsafeMutableBufferPointer { UnsafeMutableRawPointer($0.baseAddress) }
        }
        capacity.pointee = slot.spare.capacity
        return slot.spareBase
    }
}

/// Hands one message to the handler as one [UInt8] (see `message`).
private func receiveShim(_ conn: OpaquePointer?, _ buf: UnsafeRawPointer?, _ len: Int, _ ud: UnsafeMutableRawPointer?) {
    guard let conn, let raw = knet_conn_userdata(conn) else { return }
    // A borrowed (+0) reference: the C userdata keeps it alive for the whole callback,
    // so the per-message retain/release pair is not needed. Only this object is used
    // (not the serve context): the core prefetched it during the read.
    Unmanaged<TCPConnection>.fromOpaque(raw)._withUnsafeGuaranteedRef { tcp in
        // After deliver returned, its reference is gone: the spare is unique again
        // unless the handler kept the array.
        if deliver(buf, len, tcp) { tcp.loopSlot.recycleSpare() }
    }
}

/// Calls the handler with the message; returns true when it got the spare array itself.
/// Not inlined, so the message's reference ends when it returns.
@inline(never)
private func deliver(_ buf: UnsafeRawPointer?, _ len: Int, _ tcp: TCPConnection) -> Bool {
    let (bytes, source) = message(buf, len, tcp)
    tcp.handler._withUnsafeGuaranteedRef { $0.handler.receive(tcp, bytes) }
    switch source { // moved back (see `take`)
    case .spare: tcp.loopSlot.spare = bytes
    case .small: tcp.loopSlot.small = bytes
    case .other: break
    }
    return source == .spare
}

/// The message at buf as an array, and where it came from: the spare a large raw read went
/// into (no copy; moved out of the slot, `deliver` puts it back for `recycleSpare`), the
/// array a Swift codec decoded (no copy), or else one copy of the bytes (a small one into
/// the slot's small array, see `smallMessage`).
private func message(_ buf: UnsafeRawPointer?, _ len: Int, _ tcp: TCPConnection) -> ([UInt8], MessageSource) {
    let slot = tcp.loopSlot
    if tcp.rawCodec {
        if let base = slot.spareBase, buf == UnsafeRawPointer(base), len >= handOverMinimum {
            let wanted = spareCapacity(for: len)
            // The real capacity, not the count asked for: the allocator may round it up,
            // and the promise is about what the kept array pins.
            if len * 4 >= slot.spare.capacity {
                slot.spare.append(contentsOf: BytesInPlace(count: len))
                slot.spareCapacity = wanted
                slot.shortReads = 0
                return (take(&slot.spare), .spare)
            }
            // Mostly empty for reads of this size: copy this one, into the reused small
            // array (no allocation when the handler did not keep the last one). The spare
            // is sized down only after several such reads in a row: the short tail of a
            // large message alone would otherwise shrink it, the next large message then
            // take three reads into growing spares, and so on for every message.
            let bytes = slot.smallMessage(UnsafeRawBufferPointer(start: buf, count: len))
            slot.shortReads += 1
            if slot.shortReads >= shrinkAfter {
                slot.shortReads = 0
                slot.spare = []
                slot.spareBase = nil
                slot.spareCapacity = wanted
            }
            return (bytes, .small)
        }
    } else if tcp.swiftCodec {
        if slot.decodedBase == buf && slot.decoded.count == len {
            var bytes: [UInt8] = []
            swap(&bytes, &slot.decoded)
            slot.decodedBase = nil
            return (bytes, .other)
        }
    }
    guard len > 0, let buf else { return ([], .other) }
    let bytes = UnsafeRawBufferPointer(start: buf, count: len)
    if len < handOverMinimum { return (slot.smallMessage(bytes), .small) }
    // This spelling allocates through the specialized array initializer (no generic
    // metadata lookup per message).
    return (Array(bytes), .other)
}

/// The C read callback of a Swift codec: a need-more error from ByteReader means "wait for
/// more bytes" (0); any other error closes the connection with KNET_ECODEC.
private func swiftCodecRead(_ input: UnsafeRawPointer?, _ inputLength: Int,
                            _ message: UnsafeMutablePointer<UnsafeRawPointer?>?,
                            _ messageLength: UnsafeMutablePointer<Int>?,
                            _ ud: UnsafeMutableRawPointer?) -> Int {
    guard let ud, let message, let messageLength else { return Int(KNET_ECODEC) }
    // Borrowed: the serve call and its connections keep the box alive, and a retain here
    // would be an atomic per message on an object every loop thread shares.
    let box = Unmanaged<SwiftCodecBox>.fromOpaque(ud)
    var reader = ByteReader(UnsafeRawBufferPointer(start: input, count: inputLength))
    do {
        let decoded = try box._withUnsafeGuaranteedRef { try $0.codec.read(from: &reader) }
        guard reader.consumedBytes > 0 else {
            knetLogger.error("Swift codec \(codecName(box)) returned a message without consuming input")
            return Int(KNET_ECODEC)
        }
        // Over the bound the core closes the connection and never delivers the message:
        // not parked, or the loop thread's slot would keep it until its next frame.
        guard reader.consumedBytes <= box._withUnsafeGuaranteedRef({ $0.maxFrame }) else {
            return Int(KNET_ECODEC)
        }
        let slot = ThreadSlot.current
        slot.decoded = decoded
        // The array's storage stays put while the slot holds it unchanged, so the core
        // can treat it as the codec-owned message it passes to receive.
        let base = slot.decoded.withUnsafeBytes { $0.baseAddress }
        slot.decodedBase = base
        message.pointee = base
        messageLength.pointee = decoded.count
        return reader.consumedBytes
    } catch is NeedMoreBytes {
        return 0
    } catch {
        knetLogger.debug("Swift codec \(codecName(box)) rejected input: \(error)")
        return Int(KNET_ECODEC)
    }
}

/// The codec's type name, for log messages.
private func codecName(_ box: Unmanaged<SwiftCodecBox>) -> String {
    box._withUnsafeGuaranteedRef { String(describing: type(of: $0.codec)) }
}

/// The C write callback of a Swift codec (runs on the sending thread).
private func swiftCodecWrite(_ writer: OpaquePointer?, _ message: UnsafeRawPointer?, _ length: Int,
                             _ ud: UnsafeMutableRawPointer?) -> Int32 {
    guard let writer, let ud else { return KNET_ECODEC }
    let box = Unmanaged<SwiftCodecBox>.fromOpaque(ud) // borrowed, as in swiftCodecRead
    let slot = ThreadSlot.current
    let bytes: [UInt8]
    if let outgoing = slot.outgoing, slot.outgoingBase == message, outgoing.count == length {
        bytes = outgoing
    } else if let message, length > 0 {
        bytes = [UInt8](UnsafeRawBufferPointer(start: message, count: length))
    } else {
        bytes = []
    }
    var byteWriter = ByteWriter(writer)
    do {
        try box._withUnsafeGuaranteedRef { try $0.codec.write(to: &byteWriter, bytes) }
        return 0
    } catch let error as KNetError {
        let code = error.code
        return code < 0 ? code : KNET_ECODEC // a write that fails must not report success
    } catch {
        return KNET_ECODEC
    }
}
