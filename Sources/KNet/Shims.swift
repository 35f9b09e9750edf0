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
final class ThreadSlot {
    var decoded: [UInt8] = []
    var decodedBase: UnsafeRawPointer?
    var outgoing: [UInt8]?
    var outgoingBase: UnsafeRawPointer?
    /// The array the loop's next raw read goes into (see `readAlloc`): its whole capacity
    /// counts as elements until a receive cuts it to the bytes read and hands it over.
    var spare: [UInt8] = []
    var spareBase: UnsafeMutableRawPointer?
    /// Capacity of the next spare; follows the size of the last large read.
    var spareCapacity = 0

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
    init(_ codec: any Codec) { self.codec = codec }
}

/// The current connection of a client (for `TCPClient.connection`).
final class ConnectionSlot: Sendable {
    let value = LockedValue<TCPConnection?>(nil)
}

/// What the C handler's `ud` points at for one serve call (`listenAndServe` / `dialAndServe`).
final class ServeContext: Sendable {
    let handler: any TCPHandler
    let codecOwner: (any AnyObject & Sendable)?
    let swiftCodec: Bool
    /// The raw codec: a message is one read, so reads go straight into arrays (`readAlloc`).
    let rawCodec: Bool
    let clientSlot: ConnectionSlot?

    init(handler: any TCPHandler, codecOwner: (any AnyObject & Sendable)?, swiftCodec: Bool,
         rawCodec: Bool, clientSlot: ConnectionSlot?) {
        self.handler = handler
        self.codecOwner = codecOwner
        self.swiftCodec = swiftCodec
        self.rawCodec = rawCodec
        self.clientSlot = clientSlot
    }
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
private func connectShim(_ conn: OpaquePointer?, _ connected: Bool, _ ud: UnsafeMutableRawPointer?) {
    guard let conn, let ud else { return }
    let context = Unmanaged<ServeContext>.fromOpaque(ud).takeUnretainedValue()
    if connected {
        let tcp = TCPConnection(handle: conn, swiftCodec: context.swiftCodec, codecOwner: context.codecOwner)
        knet_conn_set_userdata(conn, Unmanaged.passRetained(tcp).toOpaque())
        if context.rawCodec { _ = knet_conn_set_alloc(conn, readAlloc, nil) }
        context.clientSlot?.value.withLock { $0 = tcp }
        context.handler.connect(tcp, connected: true)
    } else {
        guard let raw = knet_conn_userdata(conn) else { return }
        let reference = Unmanaged<TCPConnection>.fromOpaque(raw)
        let tcp = reference.takeUnretainedValue()
        context.clientSlot?.value.withLock { current in
            if current === tcp { current = nil }
        }
        context.handler.connect(tcp, connected: false)
        knet_conn_set_userdata(conn, nil)
        reference.release()
    }
}

/// Smallest read handed over in the spare array itself; smaller ones are copied, so a
/// kept small message does not pin a large buffer.
private let handOverMinimum = 1024

/// The capacity of a spare array for reads of `length` bytes: room to spare (a read that
/// fills the buffer costs a second read), a power of two from 4 KiB to 64 KiB.
private func spareCapacity(for length: Int) -> Int {
    var capacity = 4096
    while capacity <= length && capacity < 65_536 { capacity <<= 1 }
    return capacity
}

/// The C alloc callback of raw-codec connections (loop thread): the read goes into the
/// thread's spare array, which `receiveShim` hands to the handler without a copy.
private func readAlloc(_ conn: OpaquePointer?, _ suggested: Int, _ capacity: UnsafeMutablePointer<Int>?,
                       _ ud: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    guard let capacity else { return nil }
    let slot = ThreadSlot.current
    if slot.spareBase == nil {
        let size = slot.spareCapacity > 0 ? slot.spareCapacity : suggested
        var base: UnsafeMutableRawPointer?
        // Every byte counts as initialized at once: UInt8 has no invalid values, the read
        // writes the front before anything looks at it, and receiveShim cuts off the rest
        // unread. The storage does not move while the slot holds the only reference and
        // leaves it alone, so the core may write into it through `base`.
        slot.spare = [UInt8](unsafeUninitializedCapacity: size) { buffer, count in
            base = UnsafeMutableRawPointer(buffer.baseAddress)
            count = size
        }
        slot.spareBase = base
        slot.spareCapacity = size
    }
    capacity.pointee = slot.spare.count
    return slot.spareBase
}

/// Hands one message to the handler as one [UInt8] (see `message`).
private func receiveShim(_ conn: OpaquePointer?, _ buf: UnsafeRawPointer?, _ len: Int, _ ud: UnsafeMutableRawPointer?) {
    guard let conn, let ud, let raw = knet_conn_userdata(conn) else { return }
    // Borrowed (+0) references: the serve call and the C userdata keep both alive for
    // the whole callback, so the per-message retain/release pair is not needed.
    Unmanaged<ServeContext>.fromOpaque(ud)._withUnsafeGuaranteedRef { context in
        let bytes = message(buf, len, context)
        Unmanaged<TCPConnection>.fromOpaque(raw)._withUnsafeGuaranteedRef { tcp in
            context.handler.receive(tcp, bytes)
        }
    }
}

/// The message at buf as an array: the spare array a large raw read went into (no copy),
/// the array a Swift codec decoded (no copy), or else one copy of the bytes.
private func message(_ buf: UnsafeRawPointer?, _ len: Int, _ context: ServeContext) -> [UInt8] {
    var bytes: [UInt8] = []
    if context.rawCodec {
        let slot = ThreadSlot.current
        if let base = slot.spareBase, buf == UnsafeRawPointer(base), len >= handOverMinimum {
            let wanted = spareCapacity(for: len)
            // The real capacity, not the count asked for: the allocator may round it up,
            // and the promise is about what the kept array pins.
            if len * 4 >= slot.spare.capacity {
                swap(&bytes, &slot.spare)
                slot.spareBase = nil
                slot.spareCapacity = wanted
                bytes.removeLast(bytes.count - len) // in place: only the count changes
                return bytes
            }
            // Mostly empty for reads of this size: copy this one, size the next spare down.
            bytes = Array(UnsafeRawBufferPointer(start: buf, count: len))
            slot.spare = []
            slot.spareBase = nil
            slot.spareCapacity = wanted
            return bytes
        }
    } else if context.swiftCodec {
        let slot = ThreadSlot.current
        if slot.decodedBase == buf && slot.decoded.count == len {
            swap(&bytes, &slot.decoded)
            slot.decodedBase = nil
            return bytes
        }
    }
    if len > 0, let buf {
        // This spelling allocates through the specialized array initializer (no generic
        // metadata lookup per message).
        bytes = Array(UnsafeRawBufferPointer(start: buf, count: len))
    }
    return bytes
}

/// The C read callback of a Swift codec: a need-more error from ByteReader means "wait for
/// more bytes" (0); any other error closes the connection with KNET_ECODEC.
private func swiftCodecRead(_ input: UnsafeRawPointer?, _ inputLength: Int,
                            _ message: UnsafeMutablePointer<UnsafeRawPointer?>?,
                            _ messageLength: UnsafeMutablePointer<Int>?,
                            _ ud: UnsafeMutableRawPointer?) -> Int {
    guard let ud, let message, let messageLength else { return Int(KNET_ECODEC) }
    let box = Unmanaged<SwiftCodecBox>.fromOpaque(ud).takeUnretainedValue()
    var reader = ByteReader(UnsafeRawBufferPointer(start: input, count: inputLength))
    do {
        let decoded = try box.codec.read(from: &reader)
        guard reader.consumedBytes > 0 else {
            knetLogger.error("Swift codec \(type(of: box.codec)) returned a message without consuming input")
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
        knetLogger.debug("Swift codec \(type(of: box.codec)) rejected input: \(error)")
        return Int(KNET_ECODEC)
    }
}

/// The C write callback of a Swift codec (runs on the sending thread).
private func swiftCodecWrite(_ writer: OpaquePointer?, _ message: UnsafeRawPointer?, _ length: Int,
                             _ ud: UnsafeMutableRawPointer?) -> Int32 {
    guard let writer, let ud else { return KNET_ECODEC }
    let box = Unmanaged<SwiftCodecBox>.fromOpaque(ud).takeUnretainedValue()
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
        try box.codec.write(to: &byteWriter, bytes)
        return 0
    } catch let error as KNetError {
        return error.code
    } catch {
        return KNET_ECODEC
    }
}
